"""Where one training step of the LongNet model goes (torch.profiler, CUDA time), and whether
the GPU waits on the CPU (launch-bound) or the CPU on the GPU.

    python -m benchmarks.profile_train --model 125M --context 32768 --compile

Prints the step's wall and host-enqueue time, how busy the GPU was over the profiled steps (the
union of kernel intervals over their span), the GPU time per step by kind of kernel
(``benchmarks.common.KERNEL_KINDS``: attention kernels, our data movement around them, GEMMs,
...), then the profiler's table of the most expensive operators and kernels.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, gpu_busy, kernel_time_by_kind, require_cuda


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_train",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125M")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--attention", default="dilated")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3, help="steps profiled (after 3 untimed and 1 timed)")
    ap.add_argument("--compile", action="store_true", help="torch.compile(model.loss), as LongNetLM(compile=True)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: profile at least 1 step")
    require_cuda("benchmarks.profile_train")

    cfg = LongNetConfig.from_name(args.model, vocab_size=args.vocab, attention=args.attention)
    model = LongNet(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_fn = torch.compile(model.loss) if args.compile else model.loss
    idx = torch.randint(0, args.vocab, (1, args.context), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    wall_ms, host_ms = bench_ms(step, reps=1, warmup=3, host=True)  # host: time to enqueue everything
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    busy = gpu_busy(prof, args.steps)
    kinds = kernel_time_by_kind(prof, args.steps)
    print(f"\n=== {args.model} {args.attention} context {args.context}{' compiled' if args.compile else ''}: "
          f"step wall {wall_ms:.1f} ms, host enqueue {host_ms:.1f} ms; profiled {args.steps} steps: "
          f"{busy['span_ms_per_micro_batch']:.1f} ms per step from first to last kernel, GPU busy "
          f"{100 * busy['busy_fraction']:.1f}% of it, {sum(ms for _, ms, _ in kinds):.1f} ms of kernels in "
          f"{busy['kernels_per_micro_batch']:.0f} launches per step\n")
    print("| kernels | GPU ms per step | launches per step |\n|---|---|---|")
    for kind, ms, n in kinds:
        print(f"| {kind} | {ms:.2f} | {n:.0f} |")
    print(f"\nTotals over the {args.steps} profiled steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
