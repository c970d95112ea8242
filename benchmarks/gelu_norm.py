"""The feed-forward's GELU + sub-LayerNorm: the fused operator against the composition it
replaced (``F.gelu`` then ``F.layer_norm`` in bf16, as the model ran it), compiled and eager.

    python -m benchmarks.gelu_norm --rows 32768 131072 --width 3072

Per variant: forward and forward+backward per call (CUDA-event medians of 10 calls queued back
to back, as a model queues them), and the forward+backward's
effective bandwidth (the minimum traffic: read h; write y; read h and dy; write dh). Two more rows
time fc1's bias gradient: summed over ``dh`` by a pass of its own (as when fc1 adds its bias), or
in the operator's backward (``in_bias``, as the model runs it).
``--sweep``: also time the fused operator under other launch shapes (``gelu_norm.Launch``: rows
per program and warps of the forward; rows per step, warps and programs per SM of the backward;
each with a row of 3 x 2^k columns as three unpadded chunks or one padded one).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from longnet_lightning import gelu_norm
from longnet_lightning.gelu_norm import gelu_layer_norm

from .common import bench_ms, require_cuda


def _composition(h, w, b):
    return F.layer_norm(F.gelu(h), (h.shape[-1],), w.to(h.dtype), b.to(h.dtype), 1e-5)


class _SumOfGradient(torch.autograd.Function):
    """Identity whose backward also sums the gradient over rows: fc1's bias gradient as autograd
    computes it when fc1 adds its own bias (one more pass over ``dh``)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        g.sum(0)
        return g


def _fc1_bias_apart(h, w, b):
    return gelu_layer_norm(_SumOfGradient.apply(h), w, b)


def _fc1_bias_in(in_bias):
    return lambda h, w, b: gelu_layer_norm(h, w, b, in_bias=in_bias)


def _time(fn, h, w, b, dy, reps, calls=10):
    """Per-call GPU ms of the forward and of forward+backward: ``calls`` calls queued back to back
    per timing, so the host's per-call overhead (the operator's Python, autograd) overlaps them."""

    def fwd():
        for _ in range(calls):
            fn(h, w, b)

    def step():
        for _ in range(calls):
            torch.autograd.grad(fn(h, w, b), (h, w, b), dy)

    return bench_ms(fwd, reps=reps) / calls, bench_ms(step, reps=reps) / calls


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gelu_norm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--sweep", action="store_true", help="also try other launch shapes of the fused passes")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    require_cuda("benchmarks.gelu_norm")
    variants = {"fused operator": gelu_layer_norm, "composition, compiled": torch.compile(_composition),
                "composition, eager": _composition}
    default = gelu_norm.LAUNCH
    if args.sweep:
        shapes = [dict(fwd_rows=r, fwd_warps=w, fwd_three=t)
                  for r, w, t in ((1, 4, True), (2, 4, True), (1, 8, True), (2, 8, True), (2, 8, False))]
        shapes += [dict(bwd_rows=r, bwd_warps=w, bwd_programs_per_sm=p, bwd_three=t)
                   for r, w, p, t in ((2, 16, 1, False), (1, 16, 2, False), (4, 16, 1, False), (1, 8, 2, True),
                                      (2, 8, 2, True), (1, 16, 1, True), (2, 16, 1, True), (1, 8, 4, True))]
        for shape in shapes:
            variants["fused, " + " ".join(f"{k}={v}" for k, v in shape.items())] = shape
    print("| rows x width | variant | fwd ms | fwd+bwd ms | fwd+bwd GB/s |\n|---|---|---|---|---|")
    for m in args.rows:
        f = args.width
        h = torch.randn(m, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(f, device="cuda")).requires_grad_()
        b = (0.1 * torch.randn(f, device="cuda")).requires_grad_()
        dy = torch.randn_like(h)
        in_bias = (0.1 * torch.randn(f, device="cuda")).requires_grad_()
        for name, fn in {**variants, "fused, fc1 bias gradient summed apart": _fc1_bias_apart,
                         "fused, fc1 bias in the operator": _fc1_bias_in(in_bias)}.items():
            if isinstance(fn, dict):
                gelu_norm.LAUNCH, fn = dataclasses.replace(default, **fn), gelu_layer_norm
            try:
                fwd, both = _time(fn, h, w, b, dy, args.reps)
            finally:
                gelu_norm.LAUNCH = default
            gbs = 5 * m * f * h.element_size() / (both * 1e-3) / 1e9
            print(f"| {m:,} x {f} | {name} | {fwd:.3f} | {both:.3f} | {gbs:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
