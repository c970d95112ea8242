"""Where the time of one dilated attention forward+backward goes (torch.profiler, CUDA time).

    python benchmarks/profile_attention.py --n 1048576
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longnet_lightning.attention import DilationPattern, dilated_attention  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, nargs="*", default=[32768, 1048576])
ap.add_argument("--backend", default="sdpa")
args = ap.parse_args()
pattern = DilationPattern((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
for n in args.n:
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        out = dilated_attention(q, k, v, pattern, backend=args.backend)
        torch.autograd.grad(out, (q, k, v), dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"\n=== N={n} backend={args.backend}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
