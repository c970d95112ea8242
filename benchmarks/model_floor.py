"""How fast could the 125M model train if attention were free? One step at 32K tokens with the
attention replaced by a stand-in that returns ``v`` (same shapes, no cost), eager and compiled
(``torch.compile(model.loss)``),
next to the real model: the gap is attention, the rest bounds the reachable MFU.

    python -m benchmarks.model_floor --context 32768

Step ms: CUDA-event median of 5 steps after 3; host enqueue: until the step's last call returns.
"""
import argparse

import torch

import longnet_lightning.attention.multihead as mh
from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, require_cuda

REAL = mh.dilated_attention


def time_step(model, loss_fn, idx, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return bench_ms(step, reps=steps, warmup=3, host=True)


def variant(name, context, stub=False, compile_=False, position="xpos"):
    torch.manual_seed(0)
    attn = (lambda q, k, v, *a, **kw: v) if stub else REAL  # noqa: E731
    mh.dilated_attention = attn
    torch._dynamo.reset()
    model = LongNet(LongNetConfig.from_name("125M", vocab_size=32768, position=position)).cuda()
    loss_fn = torch.compile(model.loss) if compile_ else model.loss  # as LongNetLM(compile=True)
    idx = torch.randint(0, 32768, (1, context), device="cuda")
    try:
        wall, host = time_step(model, loss_fn, idx)
        print(f"| {name} | {wall:.1f} | {host:.1f} |", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"| {name} | {type(e).__name__}: {str(e)[:200]} | |", flush=True)
    finally:
        mh.dilated_attention = REAL


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_floor",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--compiled-only", action="store_true", help="only the two compiled variants")
    args = ap.parse_args()
    require_cuda("benchmarks.model_floor")
    print("| variant | step ms | host enqueue ms |\n|---|---|---|")
    if not args.compiled_only:
        variant("dilated attention", args.context)
        variant("attention stand-in (returns v)", args.context, stub=True)
        variant("stand-in, RoPE", args.context, stub=True, position="rope")
        variant("stand-in, no position encoding", args.context, stub=True, position="none")
    variant("stand-in, compiled", args.context, stub=True, compile_=True)
    variant("dilated attention, compiled", args.context, compile_=True)


if __name__ == "__main__":
    main()
