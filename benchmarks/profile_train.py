"""Where one training step of the LongNet model goes (torch.profiler, CUDA time), and whether
the GPU waits on the CPU (launch-bound) or the CPU on the GPU.

    python -m benchmarks.profile_train --model 125M --context 32768
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, require_cuda


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_train",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125M")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--attention", default="dilated")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile(model.loss), as LongNetLM(compile=True)")
    args = ap.parse_args()
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
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_busy = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n=== {args.model} {args.attention} context {args.context}{' compiled' if args.compile else ''}: step wall {wall_ms:.1f} ms, "
          f"host enqueue {host_ms:.1f} ms, GPU kernels {gpu_busy:.1f} ms in {launches} launches")
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
