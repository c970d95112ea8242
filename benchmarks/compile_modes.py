"""Training-step time of the 125M model under the ways it can be compiled, on one GPU:
eager, each block compiled (``blk.compile()``), or the whole loss compiled
(``torch.compile(model.loss)``, what ``LongNetLM(compile=True)`` does), with and without
activation checkpointing. The dilated attention call stays eager inside every compiled graph.

    python -m benchmarks.compile_modes

Step ms: median over 4 steps after 2 (the first, which compiles, is timed on its own).
"""
import argparse
import traceback

import torch

from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, require_cuda, wall_s


def run(context, ckpt, mode, steps=6):
    torch.manual_seed(0)
    model = LongNet(LongNetConfig.from_name("125M", vocab_size=32768, activation_checkpointing=ckpt)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if mode == "blocks":
        for blk in model.blocks:
            blk.compile()
    loss_fn = torch.compile(model.loss) if mode == "loss" else model.loss
    idx = torch.randint(0, 32768, (1, context), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        first = wall_s(step)
        ms = bench_ms(step, reps=steps - 2, warmup=1)
        print(f"| {context:,} | {ckpt} | {mode} | {ms:.1f} | {first:.1f} |", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"| {context:,} | {ckpt} | {mode} | {type(e).__name__} | |", flush=True)
        traceback.print_exc(limit=-6)


def main():
    argparse.ArgumentParser(prog="python -m benchmarks.compile_modes",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    require_cuda("benchmarks.compile_modes")
    print("| context | act. ckpt | compiled | step ms | first step s |\n|---|---|---|---|---|")
    run(65536, True, "blocks")
    run(65536, True, "eager")
    run(32768, False, "loss")
    run(32768, False, "blocks")


if __name__ == "__main__":
    main()
