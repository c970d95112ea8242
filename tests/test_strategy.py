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


def _losses(root) -> list[tuple[float, float]]:
    """``(train/loss, train/tokens)`` of every logged step."""
    (metrics,) = list(root.glob("lightning_logs/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    return [(float(r["train/loss"]), float(r["train/tokens"])) for r in rows if r.get("train/loss")]


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
    one = _fit(tmp_path / "one", tiny_corpus, cache_dir, 1)
    sp = _fit(tmp_path / "sp", tiny_corpus, cache_dir, 2, "--trainer.strategy",
              "longnet_lightning.distributed.SequenceParallelStrategy",
              "--trainer.strategy.sequence_parallel_size", "2")
    assert len(one) == len(sp) == 3
    for (a, ta), (b, tb) in zip(one, sp):
        assert abs(a - b) <= 1e-4 * abs(a) and ta == tb, (one, sp)  # tokens_seen counts each token once


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
