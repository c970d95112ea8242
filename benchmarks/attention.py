"""Dilated attention on the GPU: correctness against the dense reference, then speed and memory.

    python -m benchmarks.attention --check --sizes 8192 32768 131072 1048576

Correctness: each backend, bf16 and fp32, on fresh random inputs of awkward shapes, compared
with the float64 dense reference (relative L2 error of the output and of dq, dk, dv).
Speed: the paper pattern (w = 2048..32768, r = 1, 2, 4, 6, 12), 12 heads, head dim 64, bf16,
causal, batch 1; forward and forward+backward medians from CUDA events, effective TFLOP/s as
docs/semantics.md counts them (backward = 2.5x forward), and peak memory over the inputs,
output and gradients (``peak / io``; io = q, k, v, out, dout, dq, dk, dv). Dense causal SDPA
runs beside it.
"""
from __future__ import annotations

import argparse
import json
import warnings

import torch

from longnet_lightning.attention import AttentionSettings, DilationPattern, dilated_attention, dilated_attention_reference
from longnet_lightning.attention.kernels import KERNELS
from longnet_lightning.attention.multihead import dense_attention

from .common import PAPER, bench_ms, require_cuda

BASE = AttentionSettings()  # --forward_acc / --xformers_force change it in main()


def use(backend: str) -> tuple[str, AttentionSettings]:
    """``(backend, settings)`` for ``backend``: ``sdpa:flash`` / ``sdpa:cudnn`` pick the CUDA
    kernel behind the sdpa backend; suffixes after ``@``, joined by ``+``: ``packed`` / ``strided``
    force the plan (default: chosen by size), ``serial`` runs the merges in line
    (``overlap=False``), ``split`` splits the first branch's backward (``split_first_backward``),
    e.g. ``sdpa:cudnn@strided+serial``."""
    backend, _, mods = backend.partition("@")
    mods = set(mods.split("+")) - {""}
    if mods - {"packed", "strided", "serial", "split"}:
        raise ValueError(f"unknown backend suffix in {backend}@{'+'.join(mods)}: use packed, strided, serial, split")
    name, _, impl = backend.partition(":")
    kw = BASE.to_dict()
    kw["packed_max_tokens"] = 2**62 if "packed" in mods else 0 if "strided" in mods else BASE.packed_max_tokens
    kw["sdpa_cuda"] = impl or "cudnn"
    if "serial" in mods:
        kw["overlap"] = False
    if "split" in mods:
        kw["split_first_backward"] = True
    return name, AttentionSettings(**kw)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(backends, out_rows):
    cases = [  # (B, N, H, D, w, r, causal)
        (2, 1000, 12, 64, [128, 256, 512], [1, 2, 4], True),
        (1, 4099, 12, 64, [256, 512, 1024, 2048, 4096], [1, 2, 4, 6, 12], True),
        (3, 777, 5, 64, [100, 300], [1, 3], False),
        (1, 2048, 16, 128, [512, 2048], [1, 4], True),
    ]
    for b, n, h, d, ws, rs, causal in cases:
        g = torch.Generator(device="cuda").manual_seed(n)
        base = [torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.float64) for _ in range(3)]
        dout = torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.float64)
        ref_in = [x.clone().requires_grad_() for x in base]
        ref = dilated_attention_reference(*ref_in, DilationPattern(ws, rs), causal=causal)
        ref_g = torch.autograd.grad(ref, ref_in, dout)
        for backend in backends:
            for dtype in (torch.bfloat16, torch.float32):
                x = [t.to(dtype).requires_grad_() for t in base]
                try:
                    name, settings = use(backend)
                    out = dilated_attention(*x, ws, rs, causal=causal, backend=name, settings=settings)
                    grads = torch.autograd.grad(out, x, dout.to(dtype))
                    errs = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, ref_g)]
                    ok = all(e == e for e in errs) and max(errs) < (3e-2 if dtype == torch.bfloat16 else 1e-3)
                    row = dict(case=f"B{b} N{n} H{h} D{d} w{ws} r{rs} {'causal' if causal else 'bidir'}",
                               backend=backend, dtype=str(dtype).split(".")[-1], out=errs[0],
                               dq=errs[1], dk=errs[2], dv=errs[3], ok=ok)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    row = dict(case=f"B{b} N{n} H{h}", backend=backend, dtype=str(dtype), error=f"{type(e).__name__}: {e}"[:300], ok=False)
                out_rows.append(row)
                print(json.dumps(row), flush=True)


def speed(n, backend, reps, h=12, d=64, pattern=PAPER):
    torch.cuda.empty_cache()
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    if backend == "dense":
        f = lambda: dense_attention(q, k, v, causal=True)  # noqa: E731
        flops = 2.0 * n * n * h * d
    else:
        name, settings = use(backend)
        f = lambda: dilated_attention(q, k, v, pattern, causal=True, backend=name, settings=settings)  # noqa: E731
        flops = pattern.flops(n, h, d)

    def fb():
        out = f()
        torch.autograd.grad(out, (q, k, v), dout)

    with torch.no_grad():
        fwd = bench_ms(f, reps)
    fwdbwd = bench_ms(fb, reps)
    io = 8 * q.numel() * q.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # q, k, v, dout
    out = f()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base + 4 * q.numel() * q.element_size()
    del out, grads
    return dict(N=n, backend=backend, fwd_ms=fwd, fwdbwd_ms=fwdbwd, fwd_tflops=flops / fwd / 1e9,
                fwdbwd_tflops=3.5 * flops / fwdbwd / 1e9, peak_gib=peak / 2**30, peak_over_io=peak / io)


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare every backend with the reference first")
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 32768, 131072, 1048576])
    ap.add_argument("--backends", nargs="*", default=["sdpa:cudnn", "sdpa:flash", "xformers", "torch", "dense"])
    ap.add_argument("--dense-max", type=int, default=262144, help="largest N for dense SDPA")
    ap.add_argument("--torch-max", type=int, default=32768, help="largest N for the plain torch kernel")
    ap.add_argument("--packed-max", type=int, default=1048576, help="largest N for a forced packed plan")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default="attention.json", help="where to write every row")
    ap.add_argument("--forward_acc", default="input", choices=["input", "float32"],
                    help="AttentionSettings.forward_acc for every dilated backend")
    ap.add_argument("--xformers_force", action="store_true", help="AttentionSettings.xformers_force")
    args = ap.parse_args()
    global BASE
    BASE = AttentionSettings(forward_acc=args.forward_acc, xformers_force=args.xformers_force)
    require_cuda("benchmarks.attention")
    warnings.simplefilter("default")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    for name in {b.partition("@")[0].partition(":")[0] for b in args.backends}:
        if name in KERNELS:
            print(f"{name}: {KERNELS[name](BASE).supports(torch.zeros(1, 8, 1, 64, device='cuda', dtype=torch.bfloat16)) or 'ok'}")
    rows = []
    if args.check:
        check([b for b in args.backends if b.partition("@")[0].partition(":")[0] in KERNELS], rows)
    speed_rows = []
    for n in args.sizes:
        for backend in args.backends:
            if (backend == "dense" and n > args.dense_max) or (backend.startswith("torch") and n > args.torch_max):
                continue
            if "packed" in backend.partition("@")[2].split("+") and n > args.packed_max:
                continue
            try:
                r = speed(n, backend, args.reps)
            except Exception as e:  # noqa: BLE001
                r = dict(N=n, backend=backend, error=f"{type(e).__name__}: {e}"[:300])
            speed_rows.append(r)
            print(json.dumps(r), flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), check=rows, speed=speed_rows), f, indent=1)
    if rows:
        print("\n| case | backend | dtype | out | dq | dk | dv | ok |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['error'][:80]} | | | | no |")
            else:
                print(f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['out']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | {r['dv']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    print("\n| N | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB | peak/io |\n|---|---|---|---|---|---|---|---|")
    for r in speed_rows:
        if "error" in r:
            print(f"| {r['N']} | {r['backend']} | {r['error'][:90]} |")
        else:
            print(f"| {r['N']:,} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops']:.0f} | {r['peak_gib']:.2f} | {r['peak_over_io']:.2f} |")


if __name__ == "__main__":
    main()
