"""Peak memory of dilated attention forward+backward on the CPU (no quadratic buffers).

    python benchmarks/cpu_memory.py --backend sdpa --n 65536

Paper pattern, 12 heads, head dim 64, causal, float32, batch 1. Reports the process's peak RSS
growth over the inputs, against io = q, k, v, out, dout, dq, dk, dv (8 x N x H x D x 4 bytes);
dense attention would need N^2 x H x 4 bytes for one score matrix.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longnet_lightning.attention import DilationPattern, dilated_attention  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=65536)
ap.add_argument("--backend", default="sdpa")
args = ap.parse_args()
torch.manual_seed(0)
h, d = 12, 64
q, k, v = (torch.randn(1, args.n, h, d, requires_grad=True) for _ in range(3))
dout = torch.randn(1, args.n, h, d)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
out = dilated_attention(q, k, v, DilationPattern((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)), backend=args.backend)
t1 = time.perf_counter()
dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
io = 8 * args.n * h * d * 4
print(f"N={args.n} backend={args.backend} threads={torch.get_num_threads()} fwd {t1 - t0:.1f}s bwd {t2 - t1:.1f}s "
      f"peak growth {peak / 2**30:.2f} GiB (+ inputs {4 * args.n * h * d * 4 / 2**30:.2f} GiB); io {io / 2**30:.2f} GiB; "
      f"one dense score matrix would be {args.n**2 * h * 4 / 2**30:.0f} GiB; finite={bool(torch.isfinite(dq).all())}")
