"""What every benchmark shares: the timer, the paper's attention pattern, the CUDA check, and how
a profile's GPU kernels are read (how busy the GPU was, where its time went)."""
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


# How a profile's kernels are grouped by what they do, from the names the profiler reports (the
# first kind whose any substring is in the lower-cased name wins; the rest is "other").
KERNEL_KINDS = (
    ("attention: data movement (ours)", ("_pack_kernel", "_unpack_", "_merge_view_kernel", "_acc_view_kernel")),
    ("attention: kernels (cuDNN, flash, xformers)", ("cudnn", "fmha", "flash", "sdpa")),
    ("GEMMs (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
    ("GELU + sub-LN (ours)", ("_gln_",)),
    ("LM head + loss, row passes (ours)", ("_ce_",)),
    ("optimizer", ("multi_tensor", "adam")),
    ("Inductor's fused kernels", ("triton_",)),
    ("copies and fills", ("memcpy", "memset")),
)


def gpu_kernels(prof) -> list:
    """The GPU kernels (and copies) of a ``torch.profiler`` profile, without the ranges that
    ``record_function`` draws on the GPU's timeline (they span kernels, and would count twice)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def gpu_busy(prof, micro_batches: int) -> dict:
    """How busy the GPU was in a profile: the union of its kernel intervals over the span from
    the first kernel's start to the last one's end, and kernels per micro-batch."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in gpu_kernels(prof))
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    span = end - spans[0][0] if spans else float("nan")
    return dict(busy_fraction=busy / span, span_ms_per_micro_batch=span / 1e3 / micro_batches,
                kernels_per_micro_batch=len(spans) / micro_batches)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_time_by_kind(prof, steps: int) -> list[tuple[str, float, float]]:
    """``(kind, GPU ms per step, launches per step)`` of a profile of ``steps`` steps, most time
    first (kernels on two streams at once each count in full)."""
    ms, n = {}, {}
    for e in gpu_kernels(prof):
        kind = kernel_kind(e.name)
        ms[kind] = ms.get(kind, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / steps
        n[kind] = n.get(kind, 0) + 1 / steps
    return sorted(((k, ms[k], n[k]) for k in ms), key=lambda row: -row[1])
