"""The sequence-parallel strategy through the CLI: ``torchrun`` with 2 CPU processes (gloo).

Sequence parallelism over 2 ranks must follow the 1-process loss step by step (same batches, the
same global mean), and 2-way data parallelism must see each window once.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_args

pytestmark = pytest.mark.slow


def _rows(root) -> list[dict]:
    (metrics,) = list(root.glob("lightning_logs/version_*/metrics.csv"))
    return list(csv.DictReader(metrics.open()))


def _losses(root) -> list[tuple[float, float]]:
    """``(train/loss, train/tokens)`` of every logged step."""
    return [(float(r["train/loss"]), float(r["train/tokens"])) for r in _rows(root) if r.get("train/loss")]


def _mfu_per_token_rate(root) -> list[float]:
    """``perf/mfu / perf/tokens_per_s`` of every throughput window: FLOPs per token over the peak
    of all devices, so it falls with the number of devices and not with the timing."""
    return [float(r["perf/mfu"]) / float(r["perf/tokens_per_s"]) for r in _rows(root) if r.get("perf/mfu")]


def _fit(root, corpus, cache, nproc: int, *extra: str) -> list[float]:
    args = ["fit", *tiny_args(root, corpus, cache, steps=3, extra=("--model.model", "tiny", *extra))]
    if nproc == 1:
        cmd = [sys.executable, "-m", "longnet_lightning", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "longnet_lightning", *args, "--trainer.devices", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=root.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(root)


def test_sequence_parallel_fit_follows_one_process(tmp_path, tiny_corpus, cache_dir):
    """... and the throughput windows count the whole sequence's FLOPs per token over both devices."""
    one = _fit(tmp_path / "one", tiny_corpus, cache_dir, 1, "--throughput.peak_tflops", "1")
    sp = _fit(tmp_path / "sp", tiny_corpus, cache_dir, 2, "--trainer.strategy",
              "longnet_lightning.distributed.SequenceParallelStrategy",
              "--trainer.strategy.sequence_parallel_size", "2", "--throughput.peak_tflops", "1")
    assert len(one) == len(sp) == 3
    for (a, ta), (b, tb) in zip(one, sp):
        assert abs(a - b) <= 1e-4 * abs(a) and ta == tb, (one, sp)  # tokens_seen counts each token once
    rate_one, rate_sp = _mfu_per_token_rate(tmp_path / "one"), _mfu_per_token_rate(tmp_path / "sp")
    assert len(rate_one) == len(rate_sp) == 2  # windows: steps 1-2 and 2-3
    from longnet_lightning import load_model

    (last,) = (tmp_path / "sp").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    per_token = load_model(last).config.flops_per_token(64) / 1e12  # the whole 64-token sequence's
    assert all(abs(r - per_token) <= 1e-9 * r for r in rate_one), (rate_one, per_token)
    assert all(abs(r - per_token / 2) <= 1e-9 * r for r in rate_sp), (rate_sp, per_token)  # 2 devices


def test_data_parallel_fit_counts_every_token_once(tmp_path, tiny_corpus, cache_dir):
    """Two data-parallel ranks with 2 windows each see the global batch of 4 that one process
    sees (the samplers shard one global list), and the logged loss is its global mean."""
    one = _fit(tmp_path / "one", tiny_corpus, cache_dir, 1)
    dp = _fit(tmp_path / "dp", tiny_corpus, cache_dir, 2, "--data.batch_size", "2", "--trainer.strategy",
              "longnet_lightning.distributed.SequenceParallelStrategy", "--trainer.strategy.sequence_parallel_size", "1")
    assert len(dp) == 3
    for (a, ta), (b, tb) in zip(one, dp):
        assert abs(a - b) <= 1e-4 * abs(a) and ta == tb, (one, dp)


def test_time_budget_decides_once_for_every_rank(tmp_path, tiny_corpus, cache_dir):
    """Two data-parallel ranks with a TimeBudget: rank 0's decision holds on both (a disagreement
    would hang the collectives; the subprocess timeout turns that into a failure)."""
    import time

    dp = _fit(tmp_path / "dp", tiny_corpus, cache_dir, 2, "--data.batch_size", "2", "--trainer.strategy",
              "longnet_lightning.distributed.SequenceParallelStrategy", "--trainer.strategy.sequence_parallel_size", "1",
              "--model.warmup_steps", "5", "--trainer.max_steps", "6",
              "--trainer.callbacks+=longnet_lightning.callbacks.TimeBudget", f"--trainer.callbacks.until={time.time() + 600}",
              "--trainer.callbacks.skip_steps=0", "--trainer.callbacks.measure_steps=2")
    assert len(dp) == 6
