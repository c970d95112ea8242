"""Which layout makes the flash kernel fastest on dilated segments? (paper pattern, N = 1M)

    python -m benchmarks.layout_experiment

Per branch (w, r), flash forward and backward on:
  strided  - one call per head offset on strided views of [B, N, H, D] (no copy; current path)
  blhd     - the branch gathered into contiguous [N/w, w/r, H, D] (heads permuted by offset)
  bhld     - gathered head-major [N/w, H, w/r, D] (each head's rows contiguous)
plus the time of the gather copies (q, k, v). Kernels only; merges not included.
"""
import argparse

import torch

from .common import PAPER, bench_ms as ms, require_cuda

N, H, D = 1 << 20, 12, 64


def fwd(q, k, v):
    L = q.shape[1]
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, L, L, 0.0, True, False, scale=0.125)[:2]


def bwd(q, k, v, o, lse, do, seed, off):
    L = q.shape[1]
    return torch.ops.aten._flash_attention_backward(do, q, k, v, o, lse, None, None, L, L, 0.0, True, seed, off,
                                                    scale=0.125)


def main():
    argparse.ArgumentParser(prog="python -m benchmarks.layout_experiment",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    require_cuda("benchmarks.layout_experiment")
    seed = torch.zeros(2, dtype=torch.uint64, device="cuda")
    off = torch.zeros((), dtype=torch.uint64, device="cuda")
    x = [torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    sN, sH = H * D, D
    rows = []
    tot = {"strided": [0, 0], "blhd": [0, 0], "bhld": [0, 0], "gather": [0, 0]}
    for w, r in PAPER.branches:
        S, L, G = N // w, w // r, H // r
        # strided: per offset
        views = [[t.as_strided([S, L, G, D], [w * sN, r * sN, r * sH, 1], o * sN + o * sH) for t in x] for o in range(r)]
        res = [fwd(*vv[:3]) for vv in views]
        f_s = ms(lambda: [fwd(*vv[:3]) for vv in views])
        b_s = ms(lambda: [bwd(*vv[:3], o, lse, vv[3], seed, off) for vv, (o, lse) in zip(views, res)])
        # gathered BLHD
        src = [t.as_strided([S, L, r, G, D], [w * sN, r * sN, sN + sH, r * sH, 1], 0) for t in x]
        bufs = [torch.empty(S, L, r, G, D, device="cuda", dtype=torch.bfloat16) for _ in x]
        g_ms = ms(lambda: [b.copy_(s) for b, s in zip(bufs[:3], src[:3])])
        gq = [b.view(S, L, H, D) for b in bufs]
        o, lse = fwd(*gq[:3])
        f_b = ms(lambda: fwd(*gq[:3]))
        b_b = ms(lambda: bwd(*gq[:3], o, lse, gq[3], seed, off))
        # gathered BHLD
        hb = [torch.empty(S, r, G, L, D, device="cuda", dtype=torch.bfloat16) for _ in x]
        g2 = ms(lambda: [b.copy_(s.permute(0, 2, 3, 1, 4)) for b, s in zip(hb[:3], src[:3])])
        hq = [b.view(S, H, L, D).transpose(1, 2) for b in hb]
        o2, l2 = fwd(*hq[:3])
        f_h = ms(lambda: fwd(*hq[:3]))
        b_h = ms(lambda: bwd(*hq[:3], o2, l2, hq[3], seed, off))
        rows.append((w, r, f_s, b_s, f_b, b_b, f_h, b_h, g_ms, g2))
        for key, a, b in (("strided", f_s, b_s), ("blhd", f_b, b_b), ("bhld", f_h, b_h), ("gather", g_ms, g2)):
            tot[key][0] += a
            tot[key][1] += b
    print(torch.__version__, torch.cuda.get_device_name())
    print("| w | r | strided fwd | strided bwd | blhd fwd | blhd bwd | bhld fwd | bhld bwd | gather blhd (q,k,v) | gather bhld |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    print(f"| all | | {tot['strided'][0]:.2f} | {tot['strided'][1]:.2f} | {tot['blhd'][0]:.2f} | {tot['blhd'][1]:.2f} "
          f"| {tot['bhld'][0]:.2f} | {tot['bhld'][1]:.2f} | {tot['gather'][0]:.2f} | {tot['gather'][1]:.2f} |")


if __name__ == "__main__":
    main()
