"""The CLI end to end on tiny runs: fit/validate/test/predict, configs, links, errors, exact resume."""
from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
import yaml
from conftest import tiny_args

from longnet_lightning import __main__ as entry
from longnet_lightning.cli import CLIError, LongNetCLI, cli_main
from longnet_lightning.lm import LongNetLM


def run(sub: str, root, corpus, cache, *extra: str, steps: int = 4) -> LongNetCLI:
    return LongNetCLI(args=[sub, *tiny_args(root, corpus, cache, steps=steps, extra=extra)])


def log_dir(cli: LongNetCLI):
    from pathlib import Path

    return Path(cli.trainer.log_dir)


# ----------------------------------------------------------------------------- parsing


def test_print_config_and_interpolation(tmp_path, tiny_corpus, cache_dir, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("trainer:\n  max_steps: 37\nmodel:\n  init_args:\n    decay_steps: ${trainer.max_steps}\n")
    with pytest.raises(SystemExit) as e:
        LongNetCLI(args=["fit", *tiny_args(tmp_path, tiny_corpus, cache_dir), "--config", str(cfg), "--print_config"])
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"].endswith("LongNetLM") and out["model"]["init_args"]["decay_steps"] == 37
    assert out["data"]["class_path"].endswith("LongTextDataModule") and out["data"]["init_args"]["seq_len"] == 64
    assert out["checkpoint"]["save_last"] is True
    assert "vocab_size" not in out["model"]["init_args"]  # linked from the data, never written twice


# ----------------------------------------------------------------------------- a full cycle


def test_fit_validate_test_predict(tmp_path, tiny_corpus, cache_dir, capsys):
    root = tmp_path / "runs"
    cli = run("fit", root, tiny_corpus, cache_dir, "--checkpoint.every_n_train_steps", "3", steps=6)
    assert cli.model.hparams.vocab_size == 257 and cli.model.hparams.seq_len == 64  # from the data
    logs = log_dir(cli)
    assert logs.name == "version_0" and (logs / "config.yaml").is_file()
    saved = yaml.safe_load((logs / "config.yaml").read_text())
    assert saved["data"]["init_args"]["seq_len"] == 64
    ckpts = sorted(p.name for p in (logs / "checkpoints").iterdir())
    assert ckpts == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    metrics = (logs / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/lr", "train/tokens"} <= set(metrics)
    if (logs / "tb").exists():
        assert any(p.name.startswith("events.out.tfevents") for p in (logs / "tb").iterdir())
    last = logs / "checkpoints" / "last.ckpt"

    again = run("fit", root, tiny_corpus, cache_dir, steps=1)  # a re-run never collides with the first
    assert log_dir(again).name == "version_1"

    # validate: the logged metrics are exactly the definition over the val windows
    val = run("validate", root, tiny_corpus, cache_dir, "--ckpt_path", str(last))
    m = val.trainer.callback_metrics
    model, dm = val.model, val.datamodule
    total, count, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            total += model.model.loss(batch["input_ids"], batch["labels"], reduction="sum").double().item()
            scored = batch["labels"] != -100
            count += int(scored.sum())
            n_bytes += int((batch["labels"][scored] < 256).sum())
    assert float(m["val/loss"]) == pytest.approx(total / count, rel=1e-5)
    assert float(m["val/ppl"]) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert float(m["val/bpb"]) == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)

    with pytest.raises(CLIError, match="tokenizer has vocab_size=300 but the model vocab_size=257"):
        run("validate", root, tiny_corpus, cache_dir, "--data.tokenizer", "bpe", "--data.bpe_vocab_size", "300",
            "--ckpt_path", str(last))

    test = run("test", root, tiny_corpus, cache_dir, "--ckpt_path", str(last))
    assert {"test/loss", "test/ppl", "test/bpb"} <= set(test.trainer.callback_metrics)

    # predict: prompts in, text out (stdout and a JSON Lines file); the checkpoint brings its tokenizer
    out = tmp_path / "pred.jsonl"
    capsys.readouterr()
    LongNetCLI(args=["predict", "--ckpt_path", str(last), "--data.prompts", '["1: alpha", "# doc"]',
                     "--model.max_new_tokens", "7", "--model.stop_at_eos", "false",
                     "--prediction_writer.output", str(out), "--trainer.default_root_dir", str(root),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["1: alpha", "# doc"]
    assert all(0 < len(r["completion"].encode("utf-8", "surrogatepass")) <= 7 * 3 for r in records)
    assert "=== prompt 1 ===" in capsys.readouterr().out

    # the CLI's checkpoint rebuilds the model with no other input
    back = LongNetLM.load_from_checkpoint(last)
    for k, v in cli.model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_dense_baseline_is_one_setting(tmp_path, tiny_corpus, cache_dir):
    cli = run("fit", tmp_path, tiny_corpus, cache_dir, "--model.attention", "dense", "--trainer.logger", "false",
              steps=1)
    assert cli.model.config.attention == "dense"
    assert all(blk.attn.pattern is None for blk in cli.model.model.blocks)


# ----------------------------------------------------------------------------- bad input


def _foreign_checkpoint(path):
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}}, path)


@pytest.mark.parametrize(
    "make, needle",
    [
        (None, "does not exist"),
        (lambda p: p.write_text("not a checkpoint"), "is not a PyTorch checkpoint"),
        (lambda p: torch.save({"weights": torch.ones(2)}, p), "is not a Lightning checkpoint"),
        (_foreign_checkpoint, "not one of a LongNetLM"),
    ],
)
def test_bad_checkpoint_is_one_line(tmp_path, tiny_corpus, cache_dir, capsys, make, needle):
    path = tmp_path / "x.ckpt"
    if make is not None:
        make(path)
    args = ["validate", *tiny_args(tmp_path, tiny_corpus, cache_dir), "--ckpt_path", str(path)]
    with pytest.raises(CLIError, match=needle):
        LongNetCLI(args=args)
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: ckpt_path=") and "Traceback" not in err


@pytest.mark.parametrize("setting, value", [("seq_len", "0"), ("batch_size", "0"), ("seq_len", "-3")])
def test_impossible_data_settings_are_named(tmp_path, tiny_corpus, cache_dir, setting, value):
    with pytest.raises(CLIError, match=f"{setting}={value}"):
        run("fit", tmp_path, tiny_corpus, cache_dir, f"--data.{setting}", value)


def test_warmup_longer_than_training_is_shortened(tmp_path, tiny_corpus, cache_dir):
    with pytest.warns(UserWarning, match=r"model.warmup_steps=50 is longer than the schedule \(trainer.max_steps = 4\)"):
        cli = run("fit", tmp_path, tiny_corpus, cache_dir, "--model.warmup_steps", "50", "--trainer.logger", "false")
    assert cli.trainer.global_step == 4
    assert cli.trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0](3) == pytest.approx(1.0)


def test_evaluate_is_dispatched(monkeypatch):
    seen = {}
    fake = types.ModuleType(entry.EVALUATE_MODULE)
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, entry.EVALUATE_MODULE, fake)
    entry.main(["evaluate", "--ckpt_path", "x.ckpt"])
    assert seen["argv"] == ["--ckpt_path", "x.ckpt"]
    assert entry.EVALUATE_MODULE == "longnet_lightning.evaluation.command"


# ----------------------------------------------------------------------------- runs that lose nothing


def _weights(cli):
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


def test_resumed_run_reaches_the_same_weights(tmp_path, tiny_corpus, cache_dir):
    """A: 8 steps straight. B: 4 steps (same schedule). C: B's last.ckpt resumed to 8. Also a
    periodic mid-run checkpoint of A resumed to 8. All end with identical weights."""
    k = 4
    common = ("--model.decay_steps", str(2 * k), "--trainer.logger", "false", "--trainer.limit_val_batches", "2",
              "--data.samples_per_epoch", "400")

    def go(name, steps, *extra):
        return run("fit", tmp_path / name, tiny_corpus, cache_dir, *common,
                   "--checkpoint.dirpath", str(tmp_path / name / "ckpt"), *extra, steps=steps)

    a = go("A", 2 * k, "--checkpoint.every_n_train_steps", str(k - 1))
    go("B", k)
    c = go("C", 2 * k, "--ckpt_path", str(tmp_path / "B" / "ckpt" / "last.ckpt"))
    d = go("D", 2 * k, "--ckpt_path", str(tmp_path / "A" / "ckpt" / f"epoch=0-step={k - 1}.ckpt"))
    wa = _weights(a)
    for other in (c, d):
        assert other.trainer.global_step == 2 * k
        wo = _weights(other)
        assert all(torch.equal(wa[n], wo[n]) for n in wa)
    assert c.model.tokens_seen == a.model.tokens_seen == 2 * k * 4 * 64


# ----------------------------------------------------------------------------- the working directory stays clean


def _snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".git" not in p.parts)


def test_validate_and_predict_leave_the_working_directory_clean(tmp_path, tiny_corpus, cache_dir, monkeypatch):
    """Run from a clone of the repository (or an empty folder), with no default_root_dir:
    nothing new appears there, and `git status` stays clean; the files go to the run's root."""
    import shutil
    import subprocess
    from pathlib import Path

    from test_evaluation_golden import fixed_checkpoint

    run_dir = tmp_path / "runs" / "r" / "lightning_logs" / "version_0" / "checkpoints"
    run_dir.mkdir(parents=True)
    _, made = fixed_checkpoint(tmp_path)
    ckpt = run_dir / "last.ckpt"
    shutil.move(made, ckpt)
    repo = Path(__file__).resolve().parents[1]
    cwd = tmp_path / "clone"
    git = shutil.which("git")
    cloned = git is not None and subprocess.run([git, "clone", "-q", str(repo), str(cwd)],
                                                capture_output=True).returncode == 0
    if not cloned:
        cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _snapshot(cwd)
    data = ["--data.data_path", str(tiny_corpus), "--data.cache_dir", str(cache_dir), "--data.seq_len", "64",
            "--data.val_samples", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    LongNetCLI(args=["validate", "--ckpt_path", str(ckpt), *data])
    for logger in ("true", "false"):  # false was the case that wrote config.yaml into the working directory
        LongNetCLI(args=["predict", "--ckpt_path", str(ckpt), "--data.prompts", '["ab"]', "--model.max_new_tokens",
                         "2", "--trainer.logger", logger, "--trainer.enable_progress_bar", "false"])
    LongNetCLI(args=["validate", "--model.vocab_size", "257", *data])  # no checkpoint and no root: no file at all
    assert _snapshot(cwd) == before
    if cloned:
        status = subprocess.run([git, "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
        assert status.returncode == 0 and status.stdout == ""
    root = tmp_path / "runs" / "r"
    assert (root / "config.yaml").is_file() and (root / "lightning_logs" / "version_1").is_dir()
