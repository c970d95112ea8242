"""Peak memory of dilated attention forward+backward on the CPU (no quadratic buffers).

    python -m benchmarks.cpu_memory --backend sdpa --n 65536

Paper pattern, 12 heads, head dim 64, causal, float32, batch 1. Reports the process's peak RSS
growth over the inputs, against io = q, k, v, out, dout, dq, dk, dv (8 x N x H x D x 4 bytes);
dense attention would need N^2 x H x 4 bytes for one score matrix.
"""
import argparse
import resource

import torch

from longnet_lightning.attention import dilated_attention

from .common import PAPER, wall_s


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_memory",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--backend", default="sdpa")
    args = ap.parse_args()
    torch.manual_seed(0)
    h, d = 12, 64
    q, k, v = (torch.randn(1, args.n, h, d, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, args.n, h, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {}
    t_fwd = wall_s(lambda: res.update(out=dilated_attention(q, k, v, PAPER, backend=args.backend)))
    t_bwd = wall_s(lambda: res.update(grads=torch.autograd.grad(res["out"], (q, k, v), dout)))
    dq = res["grads"][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    io = 8 * args.n * h * d * 4
    print(f"N={args.n} backend={args.backend} threads={torch.get_num_threads()} fwd {t_fwd:.1f}s bwd {t_bwd:.1f}s "
          f"peak growth {peak / 2**30:.2f} GiB (+ inputs {4 * args.n * h * d * 4 / 2**30:.2f} GiB); "
          f"io {io / 2**30:.2f} GiB; one dense score matrix would be {args.n**2 * h * 4 / 2**30:.0f} GiB; "
          f"finite={bool(torch.isfinite(dq).all())}")


if __name__ == "__main__":
    main()
