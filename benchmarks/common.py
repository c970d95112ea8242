"""What every benchmark shares: the timer, the paper's attention pattern, the CUDA check."""
from __future__ import annotations

import statistics
import time

import torch

from longnet_lightning.attention import DilationPattern
from longnet_lightning.model import PATTERNS

# LongNet Sec. 4.1: w = 2048 ... 32768, r = 1, 2, 4, 6, 12.
PAPER = DilationPattern(*PATTERNS["paper"])


def require_cuda(script: str) -> None:
    """Exit with one line (no traceback) when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA GPU, and torch {torch.__version__} sees none")


def bench_ms(fn, reps: int = 10, warmup: int = 2, host: bool = False):
    """Median CUDA-event time of ``fn()`` in ms over ``reps`` calls, after ``warmup`` untimed calls.

    With ``host=True`` returns ``(median ms, median host-enqueue ms)``; the second is the time
    until ``fn`` returns, before the GPU has finished (close to the first when launch-bound).
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, hosts = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        hosts.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return (statistics.median(times), statistics.median(hosts)) if host else statistics.median(times)


def wall_s(fn) -> float:
    """Wall-clock seconds of one call of ``fn``, GPU work included (e.g. a first, compiling step)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0

