"""Where one training step of the LongNet model goes (torch.profiler, CUDA time), and whether
the GPU waits on the CPU (launch-bound) or the CPU on the GPU.

    python benchmarks/profile_train.py --model 125M --context 32768
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from longnet_lightning.model import LongNet, LongNetConfig  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="125M")
ap.add_argument("--context", type=int, default=32768)
ap.add_argument("--vocab", type=int, default=32768)
ap.add_argument("--attention", default="dilated")
ap.add_argument("--rows", type=int, default=30)
args = ap.parse_args()

cfg = LongNetConfig.from_name(args.model, vocab_size=args.vocab, attention=args.attention)
model = LongNet(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
idx = torch.randint(0, args.vocab, (1, args.context), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(idx, idx)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
step()
t_cpu = time.perf_counter() - t0  # time to enqueue everything
torch.cuda.synchronize()
t_all = time.perf_counter() - t0
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
events = prof.key_averages()
gpu_busy = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
print(f"\n=== {args.model} {args.attention} context {args.context}: step wall {1e3 * t_all:.1f} ms, "
      f"host enqueue {1e3 * t_cpu:.1f} ms, GPU kernels {gpu_busy:.1f} ms in {launches} launches")
print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
