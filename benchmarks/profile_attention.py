"""Where the time of one dilated attention forward+backward goes (torch.profiler, CUDA time).

    python -m benchmarks.profile_attention --n 1048576

Paper pattern, 12 heads, head dim 64, bf16, causal, batch 1; three warm-up steps, one profiled.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from longnet_lightning.attention import dilated_attention

from .common import PAPER, require_cuda


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_attention",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[32768, 1048576])
    ap.add_argument("--backend", default="sdpa")
    args = ap.parse_args()
    require_cuda("benchmarks.profile_attention")
    for n in args.n:
        q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def step():
            out = dilated_attention(q, k, v, PAPER, backend=args.backend)
            torch.autograd.grad(out, (q, k, v), dout)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"\n=== N={n} backend={args.backend}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
