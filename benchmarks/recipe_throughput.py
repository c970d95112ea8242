"""Training throughput of a recipe as a user runs it: ``python -m longnet_lightning fit --config
recipes/<recipe>.yaml`` inside Lightning's loop, beside the bare training step of
:mod:`benchmarks.train_throughput` on the same model, in the same process.

    python -m benchmarks.recipe_throughput --config recipes/longnet-125m-32k.yaml --skip 8 --measure 32

The recipe runs unchanged except for: no validation, no checkpoint files, a temporary run folder,
and as many micro-batches as the measurement needs (``--set`` adds any other override, e.g.
``--set --model.compile false``). Its data is the recipe's (the embedded default corpus unless
``LONGNET_DATA`` is set). Timing: the GPU is synchronised at the end of micro-batch ``skip`` and
of micro-batch ``skip + measure``, nowhere else, so the loop runs as it does in training; the
number is the wall time between the two divided by ``measure``.

``--syncs N``: for N micro-batches after ``skip``, every operation that makes the host wait for
the GPU (``torch.cuda.set_sync_debug_mode``) is counted by where it was called from. A sync in
each micro-batch stops the host from queueing the next one while the GPU works.

The recipe's own ``Throughput`` callback runs with windows of one optimizer step; its last window
(what the training logs would show as ``perf/tokens_per_s`` and ``perf/mfu``) is a row of its own.

``--profile N``: after the timed micro-batches, N more run under ``torch.profiler``; it prints how
busy the GPU was between its first and last kernel of those N (the union of kernel intervals over
that span: below 100% the GPU waited for the host), kernels per micro-batch, and the
kernels that took the most time (the whole table goes to ``--json``'s folder as a ``.txt``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
import traceback
import warnings

import torch
from lightning.pytorch.callbacks import Callback

from .common import gpu_busy, require_cuda
from .train_throughput import MODES, mfu, run_config


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time of micro-batches ``skip + 1 .. skip + measure``, and the host syncs of the first ``syncs``."""

    def __init__(self, skip: int, measure: int, syncs: int = 0, profile: int = 0):
        self.skip, self.measure, self.syncs, self.profile = skip, measure, syncs, profile
        self.prof = None
        self.t0 = self.seconds = None
        self.sites: collections.Counter = collections.Counter()
        self._show = None
        self.logged: dict = {}  # the Throughput callback's last window

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.num_training_batches < self.skip + self.measure + self.profile + 1:  # batch_idx restarts each epoch
            raise ValueError(f"--skip {self.skip} + --measure {self.measure} + --profile {self.profile} micro-batches "
                             f"do not fit in one epoch of {trainer.num_training_batches}; lower them or use more data")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
            if self.syncs:
                self._start_sync_log()
        if self.syncs and batch_idx == self.skip + self.syncs:
            self._stop_sync_log()
        if batch_idx == self.skip + self.measure:
            _sync()
            self.seconds = (time.perf_counter() - self.t0) / self.measure
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            # reserved: also the CUDA graphs' memory pools, which hold their tensors between replays
            self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
            self.config = pl_module.model.config
            self.shape = tuple(batch["input_ids"].shape)  # [B, T] of one micro-batch
            if self.profile:
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            else:
                trainer.should_stop = True
        if self.profile and batch_idx == self.skip + self.measure + self.profile:
            _sync()
            self.prof.__exit__(None, None, None)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        from longnet_lightning.callbacks import Throughput

        self.logged = next((cb.latest for cb in trainer.callbacks if isinstance(cb, Throughput)), {})

    def _start_sync_log(self):
        self._show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self._show(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
            # the innermost callers outside torch itself (Lightning's frames count: its loop may sync)
            outside = [f for f in frames if "/site-packages/torch/" not in f.filename][-4:]
            if outside and outside[-1].name == "_start_sync_log":
                return  # the switch itself, not the training loop
            self.sites[" < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(outside))] += 1

        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _stop_sync_log(self):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show


def run_recipe(config: str, skip: int, measure: int, syncs: int, extra: list[str], profile: int = 0) -> dict:
    from longnet_lightning.cli import cli_main

    timer = StepTimer(skip, measure, syncs, profile)
    with tempfile.TemporaryDirectory() as root:
        args = ["fit", "--config", config, "--trainer.default_root_dir", root,
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1",
                "--trainer.limit_train_batches", str(skip + measure + profile + 1), "--trainer.enable_progress_bar", "true",
                "--checkpoint.every_n_train_steps", "1000000", "--checkpoint.save_last", "false",
                "--model.decay_steps", "1000", "--throughput.every_n_steps", "1", *extra]
        t = time.perf_counter()
        cli_main(args, trainer_defaults={"callbacks": [timer]})
        total = time.perf_counter() - t
    if timer.seconds is None:
        raise SystemExit(f"the run ended before micro-batch {skip + measure}: an epoch has fewer batches "
                         "than --skip + --measure; lower them")
    bsz, context = timer.shape
    tps = bsz * context / timer.seconds
    if timer.prof is not None:
        timer.profiled = gpu_busy(timer.prof, profile)
    return dict(where="recipe", config=config, extra=extra, batch=bsz, context=context,
                micro_batch_s=timer.seconds, tokens_per_s=tps, mfu=mfu(timer.config.flops_per_token(context), tps),
                peak_gib=timer.peak_gib, reserved_gib=timer.reserved_gib, run_s=total, syncs=dict(timer.sites), logged=timer.logged,
                profile=getattr(timer, "profiled", None), prof=timer.prof), timer.config


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.recipe_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recipes/longnet-125m-32k.yaml")
    ap.add_argument("--skip", type=int, default=8, help="micro-batches before timing (compilation, warm-up)")
    ap.add_argument("--measure", type=int, default=32, help="micro-batches timed")
    ap.add_argument("--syncs", type=int, default=2, help="micro-batches whose host syncs are counted")
    ap.add_argument("--profile", type=int, default=0, help="micro-batches profiled after the timed ones")
    ap.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="further recipe overrides (last)")
    ap.add_argument("--bare", choices=[*MODES, "none"], default="compiled",
                    help="also time train_throughput's bare step of the same model in this mode")
    ap.add_argument("--json", default="recipe_throughput.json")
    args = ap.parse_args()
    for name, least in (("skip", 0), ("measure", 1), ("syncs", 0), ("profile", 0)):
        if getattr(args, name) < least:
            ap.error(f"--{name} {getattr(args, name)}: must be at least {least}")
    require_cuda("benchmarks.recipe_throughput")
    rec, cfg = run_recipe(args.config, args.skip, args.measure, args.syncs, args.set, args.profile)
    prof = rec.pop("prof")
    rows = [rec]
    if rec["logged"]:
        tps = rec["logged"]["perf/tokens_per_s"]
        rows.append(dict(where="recipe, its Throughput log (last optimizer step)",
                         micro_batch_s=rec["batch"] * rec["context"] / tps, tokens_per_s=tps,
                         mfu=rec["logged"].get("perf/mfu", float("nan")), peak_gib=rec["peak_gib"],
                         reserved_gib=rec["reserved_gib"]))
    if args.bare != "none":
        b = run_config(cfg, rec["context"], rec["batch"] * rec["context"], 8, args.bare)
        rows.append(dict(where=f"bare step ({args.bare})", micro_batch_s=b.get("step_s"),
                         tokens_per_s=b.get("tokens_per_s"), mfu=b.get("mfu"), peak_gib=b.get("peak_gib"),
                         error=b.get("error")))
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    for site, count in sorted(rec["syncs"].items(), key=lambda kv: -kv[1]):
        print(f"sync x{count}: {site}")
    if prof is not None:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=80)
        with open(os.path.splitext(args.json)[0] + "_profile.txt", "w") as f:
            f.write(table)
        print(table[:6000])
        p = rec["profile"]
        print(f"profiled {args.profile} micro-batches: GPU busy {100 * p['busy_fraction']:.1f}% of its span "
              f"({p['span_ms_per_micro_batch']:.1f} ms per micro-batch), "
              f"{p['kernels_per_micro_batch']:.0f} kernels per micro-batch")
    print("| where | s per micro-batch | tokens/s | MFU | peak GiB | reserved GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        if r.get("micro_batch_s") is None:
            print(f"| {r['where']} | {r.get('error')} | | | | |")
            continue
        print(f"| {r['where']} | {r['micro_batch_s']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_gib']:.1f} | {r.get('reserved_gib', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
