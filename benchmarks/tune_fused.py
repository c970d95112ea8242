"""Launch shapes of the Triton data-movement kernels (attention/fused.py): GB/s per
(elements per program, warps), on the real kernel outputs of the paper pattern's shapes.

    python -m benchmarks.tune_fused            # prints a table and the best fused.LAUNCH entries

Strided plan: a ``(w=4096, r=2)`` block of N = 1M (merge in bf16, gradient accumulation).
Packed plan: branch ``(4096, 2)`` of N = 32K (gather of five tensors and the LSE, merge, scatter-add).
"""
import argparse

import torch

from longnet_lightning.attention import fused
from longnet_lightning.attention.kernels import KERNELS
from longnet_lightning.attention.pattern import block_view
from longnet_lightning.attention.plan import chunks, plan_branch, split_block

from .common import bench_ms, require_cuda

CONFIGS = [(1024, 2), (2048, 2), (2048, 4), (4096, 4), (8192, 4), (4096, 8), (8192, 8), (16384, 8)]


def main():
    argparse.ArgumentParser(prog="python -m benchmarks.tune_fused",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    require_cuda("benchmarks.tune_fused")
    kern, h, d, bf = KERNELS["sdpa"](), 12, 64, torch.bfloat16
    new = lambda *shape, dtype=bf: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
    # strided plan, N = 1M
    n = 2**20
    q, k, v, out, dout = (new(1, n, h, d) for _ in range(5))
    lse = new(1, n, h, dtype=torch.float32)
    blk = split_block(plan_branch(n, h, 4096, 2, 1)[0], 2**19)[0]
    views = [block_view(x, blk) for x in (q, k, v)]
    o, lo = kern.forward(*views, True, 0.125)
    grads = kern.backward(block_view(dout, blk), *views, block_view(out, blk), lo, True, 0.125)
    rows = blk.bt * blk.length * blk.heads
    # packed plan, N = 32K
    n2 = 2**15
    xs = [new(1, n2, h, d) for _ in range(5)]
    lse2 = new(1, n2, h, dtype=torch.float32)
    c = chunks(1, n2, h, 4096, 2, 2**19)[0]
    (qp, kp, vp, op, dop), lp = fused.pack(xs, c, lse2, triton=True)
    o2, lo2 = kern.forward(qp, kp, vp, True, 0.125)
    g2 = kern.backward(dop, qp, kp, vp, op, lp, True, 0.125)
    cases = {  # kernel name: (bytes moved, call)
        "_merge_view_kernel": (rows * d * 6, lambda: fused.merge_view_(block_view(out, blk), block_view(lse, blk), o, lo, False, triton=True)),
        "_acc_view_kernel": (rows * d * 18, lambda: fused.accumulate_view_([block_view(x, blk) for x in (q, k, v)], grads, False, triton=True)),
        "_pack_kernel": (c.rows * d * 20, lambda: fused.pack(xs, c, lse2, triton=True)),
        "_unpack_merge_kernel": (c.rows * d * 6, lambda: fused.unpack_merge_(xs[3], lse2, o2, lo2, c, False, triton=True)),
        "_unpack_acc_kernel": (c.rows * d * 18, lambda: fused.unpack_accumulate_(xs[:3], g2, c, False, triton=True)),
    }
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; GB/s")
    print("| elems, warps | " + " | ".join(cases) + " |\n|---|" + "---|" * len(cases))
    best = {}
    for cfg in CONFIGS:
        row = []
        for name, (nbytes, fn) in cases.items():
            fused.LAUNCH[name] = cfg
            gbs = nbytes / bench_ms(fn, reps=20) / 1e6
            row.append(gbs)
            best[name] = max(best.get(name, (0, cfg)), (gbs, cfg))
            fused.LAUNCH.pop(name)
        print(f"| {cfg} | " + " | ".join(f"{x:.0f}" for x in row) + " |", flush=True)
    print("best fused.LAUNCH entries: " + ", ".join(f"{k}: {c}" for k, (_, c) in best.items()))


if __name__ == "__main__":
    main()
