"""A new user's first runs: short runs of a recipe, resuming with ``--ckpt_path last``, one-file
corpora, interpolations that follow overrides, quiet defaults."""
from __future__ import annotations

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
