"""Training throughput of the LongNet model on one GPU: tokens/s, MFU, peak memory.

    python -m benchmarks.train_throughput --model 125M --contexts 8192 32768 131072 1048576

One optimizer step = forward + backward + AdamW, bf16 autocast, batch = max(1, tokens // context).
MFU = model FLOPs per token (LongNetConfig.flops_per_token: 6 x matmul parameters incl. the LM
head, plus attention as docs/semantics.md counts it, backward = 2.5 x forward) x tokens/s / peak,
with the H200's dense bf16 peak of 989 TFLOP/s (datasheet). Dense attention runs beside dilated.
"""
import argparse
import json

import torch

from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, require_cuda

PEAK = 989e12


def run(model_name, attention, context, tokens, vocab, steps, ckpt, compile_blocks=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = LongNetConfig.from_name(model_name, vocab_size=vocab, attention=attention, activation_checkpointing=ckpt,
                                  position="xpos" if attention == "dilated" or context <= 65536 else "rope")
    model = LongNet(cfg).cuda()
    if compile_blocks:  # torch.compile each block; the dilated attention call stays eager (a graph break)
        for blk in model.blocks:
            blk.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    bsz = max(1, tokens // context)
    idx = torch.randint(0, vocab, (bsz, context), device="cuda")
    last = {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            last["loss"] = loss = model.loss(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        t = bench_ms(step, reps=steps, warmup=2) / 1e3  # CUDA-event median after 2 warm-up steps
    except torch.OutOfMemoryError:
        return dict(model=model_name, attention=attention, context=context, ckpt=ckpt, compiled=compile_blocks,
                    error="OOM")
    except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
        return dict(model=model_name, attention=attention, context=context, ckpt=ckpt, compiled=compile_blocks,
                    error=f"{type(e).__name__}: {e}"[:200])
    tps = bsz * context / t
    return dict(model=model_name, attention=attention, context=context, batch=bsz, ckpt=ckpt,
                compiled=compile_blocks, step_s=t,
                tokens_per_s=tps, mfu=cfg.flops_per_token(context) * tps / PEAK,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(last["loss"]))


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125M")
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 131072, 1048576])
    ap.add_argument("--attention", nargs="*", default=["dilated", "dense"])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens // context)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dense-max", type=int, default=131072)
    ap.add_argument("--ckpt-from", type=int, default=262144, help="activation checkpointing from this context")
    ap.add_argument("--compile", nargs="*", type=int, default=[0], help="0: eager, 1: torch.compile the blocks")
    ap.add_argument("--json", default="train_throughput.json", help="where to write every row")
    args = ap.parse_args()
    require_cuda("benchmarks.train_throughput")
    rows = []
    for ctx in args.contexts:
        for att in args.attention:
            if att == "dense" and ctx > args.dense_max:
                continue
            for comp in args.compile:
                r = run(args.model, att, ctx, args.tokens, args.vocab, args.steps if ctx < 2**20 else 3,
                        ctx >= args.ckpt_from, bool(comp))
                rows.append(r)
                print(json.dumps(r), flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| model | attention | context | batch | act. ckpt | compiled | step s | tokens/s | MFU | peak GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['attention']} | {r['context']:,} | {r.get('batch', '')} | {r['ckpt']} | {r['compiled']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | |")
        else:
            print(f"{head} {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
