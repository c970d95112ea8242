"""A new user's first runs: short runs of a recipe, resuming with ``--ckpt_path last``, one-file
corpora, interpolations that follow overrides, quiet defaults."""
from __future__ import annotations

import logging
import os
import time
import warnings

import pytest
import yaml
from conftest import REPO, tiny_args

from longnet_lightning.cli import CLIError, LongNetCLI
from longnet_lightning.lm import LongNetLM

QUICKSTART = str(REPO / "recipes" / "quickstart-cpu.yaml")


def quickstart(tmp_path, corpus, cache, *extra: str) -> LongNetCLI:
    """The quickstart recipe on a tiny corpus (its own warm-up of 50 and val_check_interval of 100)."""
    return LongNetCLI(args=[
        "fit", "--config", QUICKSTART, "--data.data_path", str(corpus), "--data.cache_dir", str(cache),
        "--data.seq_len", "64", "--data.batch_size", "4", "--data.val_samples", "4",
        "--data.val_fraction", "0.2", "--data.test_fraction", "0.2",
        "--model.overrides", "{n_layer: 1, n_embd: 32, n_head: 2, ffn_dim: 64}",
        "--model.segment_lengths", "[32, 64]", "--model.dilation_rates", "[1, 2]",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *extra])


# ----------------------------------------------------------------------------- 1. short runs


@pytest.mark.parametrize("extra", [("--trainer.fast_dev_run", "true"), ("--trainer.max_steps", "3")],
                         ids=["fast_dev_run", "max_steps=3"])
def test_short_runs_of_the_quickstart_recipe(tmp_path, tiny_corpus, cache_dir, extra):
    with pytest.warns(UserWarning, match=r"model.warmup_steps=50 is longer than the schedule"):
        cli = quickstart(tmp_path, tiny_corpus, cache_dir, *extra)
    assert cli.trainer.global_step == (1 if "fast_dev_run" in extra[0] else 3)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_shortens_its_warmup(recipe, capsys):
    """Every recipe's warm-up fits a 3-step run: the schedule adapts, with one warning."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        LongNetCLI(args=["fit", "--config", str(recipe), "--trainer.max_steps", "3", "--print_config"])
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    lm = LongNetLM(**{k: v for k, v in init.items() if k not in ("vocab_size", "seq_len")})
    with pytest.warns(UserWarning, match="warming up over 3 steps instead") as seen:
        warmup = lm.effective_warmup_steps(3, "trainer.max_steps")
    assert warmup == 3 and len(seen) == 1
    assert lm.lr_schedule(3, warmup)(2) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- 3. --ckpt_path last


def test_ckpt_path_last_resumes_the_newest_run(tmp_path, tiny_corpus, cache_dir):
    root = tmp_path / "runs"
    first = LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=2)])
    assert first.trainer.global_step == 2
    with pytest.raises(CLIError):  # a failed run takes a version folder ...
        LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=2), "--data.tokenizer", "nope"])
    time.sleep(0.01)
    resumed = LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=4), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4  # ... and `last` still finds the newest last.ckpt: a resume, not a restart
    newest = max(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.parent.parent.name == os.path.basename(resumed.trainer.log_dir)
    # a run folder works as --ckpt_path for every subcommand
    val = LongNetCLI(args=["validate", *tiny_args(root, tiny_corpus, cache_dir), "--ckpt_path", str(root)])
    assert "val/loss" in val.trainer.callback_metrics


def test_ckpt_path_last_without_a_run_names_where_it_looked(tmp_path, tiny_corpus, cache_dir):
    root = tmp_path / "empty"
    with pytest.raises(CLIError, match=rf"ckpt_path='last': no last.ckpt found \(looked in {root}"):
        LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir), "--ckpt_path", "last"])


# ----------------------------------------------------------------------------- 5. interpolation


def test_recipe_interpolation_follows_the_command_line(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit):
        LongNetCLI(args=["fit", "--config", QUICKSTART, "--trainer.val_check_interval", "7", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["val_check_interval"] == 7 and cfg["checkpoint"]["every_n_train_steps"] == 7


# ----------------------------------------------------------------------------- 4. corpora as users hold them


def _book(path, chapters: int = 60):
    words = "call me ishmael some years ago never mind how long precisely having little money".split()
    path.write_text("".join(f"Chapter {i}. " + " ".join(words[(i + j) % len(words)] for j in range(60)) + "\n"
                            for i in range(chapters)))
    return path


def test_one_text_file_is_a_corpus_with_one_flag(tmp_path, cache_dir, caplog):
    """One book: validation and test are token ranges (the log says so); the recipe's interval of
    100 steps is longer than the epoch and adapts with a note."""
    book = _book(tmp_path / "book.txt")
    caplog.set_level(logging.INFO)
    cli = LongNetCLI(args=["fit", "--config", QUICKSTART, "--data.data_path", str(book), "--data.cache_dir",
                           str(cache_dir), "--data.seq_len", "64", "--trainer.max_steps", "2",
                           "--model.warmup_steps", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
                           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert cli.trainer.global_step == 2
    log = caplog.text
    assert "1 documents are too few for document-level splits" in log and "carved from token ranges" in log
    assert "is longer than an epoch" in log
    cache = cli.datamodule._token_cache()
    sizes = {s: cache.split(s).n_tokens for s in ("train", "val", "test")}
    total = sum(sizes.values())
    assert sizes["val"] == pytest.approx(0.05 * total, abs=3) and sizes["test"] == pytest.approx(0.05 * total, abs=3)
    assert cache.split("val").names == ["book.txt@val"]
    dm = cli.datamodule
    dm.setup("test")
    assert len(dm.datasets["test"]) > 0


def test_few_documents_with_a_large_val_fraction(tmp_path, cache_dir):
    from conftest import write_tiny_corpus

    from longnet_lightning.data import LongTextDataModule

    corpus = write_tiny_corpus(tmp_path / "seven", n_docs=7)
    dm = LongTextDataModule(corpus, seq_len=16, batch_size=2, val_fraction=0.3, cache_dir=str(cache_dir))
    dm.setup("fit")
    cache = dm._token_cache()
    assert cache.index["split_mode"] in ("documents", "tokens")
    assert all(cache.split(s).n_tokens > 0 for s in ("train", "val", "test"))


# ----------------------------------------------------------------------------- 6. predict


def test_predict_uses_the_checkpoints_sampling_settings(tmp_path, tiny_corpus, cache_dir):
    root = tmp_path / "runs"
    LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=1), "--model.temperature", "0.5",
                     "--model.top_k", "7", "--model.max_new_tokens", "3"])
    common = ["predict", "--ckpt_path", str(root), "--data.prompts", '["ab"]', "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--prediction_writer.stdout", "false"]
    hp = LongNetCLI(args=common).model.hparams
    assert (hp.temperature, hp.top_k, hp.max_new_tokens) == (0.5, 7, 3)
    hp = LongNetCLI(args=[*common, "--model.top_k", "2"]).model.hparams  # an override wins
    assert (hp.temperature, hp.top_k) == (0.5, 2)


def test_predict_without_a_checkpoint(tmp_path):
    with pytest.raises(CLIError, match="predict needs a trained model: pass --ckpt_path"):
        LongNetCLI(args=["predict", "--data.prompts", '["ab"]', "--trainer.logger", "false"])
    with pytest.warns(UserWarning, match="samples from untrained"):
        LongNetCLI(args=["predict", "--data.prompts", '["ab"]', "--data.tokenizer", "byte", "--model.max_new_tokens",
                         "2", "--trainer.enable_progress_bar", "false", "--prediction_writer.stdout", "false"])


def test_predict_prints_no_checkpoint_notice(tmp_path, tiny_corpus, cache_dir):
    root = tmp_path / "runs"
    LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=1)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LongNetCLI(args=["predict", "--ckpt_path", str(root), "--data.prompts", '["ab"]', "--model.max_new_tokens", "2",
                         "--trainer.enable_progress_bar", "false", "--prediction_writer.stdout", "false"])
    noise = [str(w.message) for w in seen if "callbacks used to create" in str(w.message) or "LeafSpec" in str(w.message)]
    assert not noise


# ----------------------------------------------------------------------------- 8. quiet defaults


def test_the_progress_bar_knows_its_total_after_a_resume(tmp_path, tiny_corpus, cache_dir):
    root = tmp_path / "runs"
    bar = ("--trainer.enable_progress_bar", "true", "--data.samples_per_epoch", "400")
    LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=2), *bar])
    cli = LongNetCLI(args=["fit", *tiny_args(root, tiny_corpus, cache_dir, steps=5), *bar, "--ckpt_path", "last"])
    progress = cli.trainer.progress_bar_callback.train_progress_bar
    assert progress.total == 5 and progress.n == 5 and progress.desc.startswith("Epoch 0")


def test_skipping_a_tiny_share_of_the_training_tokens_is_not_a_warning(tmp_path, cache_dir, caplog):
    from longnet_lightning.data import LongTextDataModule

    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"long{i}.txt").write_text("x" * 2000)
    (corpus / "short.txt").write_text("tiny")
    dm = LongTextDataModule(str(corpus), seq_len=64, batch_size=2, val_fraction=0.0, test_fraction=0.0,
                            cache_dir=str(cache_dir))
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("fit")
    assert dm.datasets["train"].skipped_docs == 1
    assert "(4 tokens, under 0.1% of the training tokens)" in caplog.text


def test_no_lightning_advert_on_the_default_path(tmp_path, tiny_corpus, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    LongNetCLI(args=["fit", *tiny_args(tmp_path, tiny_corpus, cache_dir, steps=1)])
    assert "Tip:" not in caplog.text and "Seed set to 0" in caplog.text


def test_a_parquet_corpus_trains_like_json_lines(tmp_path, cache_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from longnet_lightning.data import LongTextDataModule

    texts = [f"record {i}: " + "lorem ipsum dolor sit amet " * (3 + i % 4) for i in range(40)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    dm = LongTextDataModule(str(tmp_path / "corpus.parquet"), seq_len=32, batch_size=2, val_fraction=0.1,
                            test_fraction=0.1, cache_dir=str(cache_dir))
    dm.setup("fit")
    cache = dm._token_cache()
    assert sum(len(cache.split(s).names) for s in ("train", "val", "test")) == 40
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 32)
