"""Training throughput of the LongNet model on one GPU: tokens/s, MFU, peak memory, and a
correctness check of every mode against the dense reference.

    python -m benchmarks.train_throughput --model 125M --contexts 8192 32768 131072 1048576 \\
        --modes eager compiled --check

One optimizer step = forward + backward + gradient clipping + AdamW (fused), bf16 autocast,
batch = max(1, tokens // context). Modes:
* ``eager``;
* ``compiled``: ``torch.compile(model.loss)``, what ``LongNetLM(compile=True)`` does;
* ``graphs``: the same with CUDA graphs (``mode="reduce-overhead"``), what ``LongNetLM(compile=True,
  cuda_graphs=True)`` does;
* ``autotune``: ``mode="max-autotune-no-cudagraphs"`` (Inductor times Triton GEMM templates against
  cuBLAS for each matrix shape; slow to compile);
* ``autotune-graphs``: ``mode="max-autotune"`` (the same, with CUDA graphs).
MFU = model FLOPs per token (LongNetConfig.flops_per_token: 6 x matmul parameters incl. the LM
head, plus attention as docs/semantics.md counts it, backward = 2.5 x forward) x tokens/s / peak,
with the GPU's dense bf16 peak (``callbacks.peak_flops``, the denominator of the training logs'
``perf/mfu``: 989 TFLOP/s on an H200). Dense attention runs beside dilated.

``--check``: for each mode, a 2-layer model of the same width at ``--check-context`` tokens, bf16,
against the same weights in float64 with the dense ``N x N`` reference attention of
docs/semantics.md: relative L2 error of the loss and of every parameter's gradient.
"""
import argparse
import json

import torch

from longnet_lightning.callbacks import peak_flops
from longnet_lightning.model import LongNet, LongNetConfig

from .common import bench_ms, require_cuda, wall_s

MODES = ("eager", "compiled", "graphs", "autotune", "autotune-graphs")
COMPILE_MODE = {"compiled": None, "graphs": "reduce-overhead", "autotune": "max-autotune-no-cudagraphs",
                "autotune-graphs": "max-autotune"}


def _graphed(mode) -> bool:
    return mode in ("graphs", "autotune-graphs")


def mfu(flops_per_token: float, tokens_per_s: float) -> float:
    """Model FLOPs utilisation on this GPU in bf16 (NaN where its peak is not known)."""
    peak = peak_flops(torch.device("cuda"), torch.bfloat16)
    return flops_per_token * tokens_per_s / peak if peak else float("nan")


def _loss_fn(model, mode):
    if mode == "eager":
        return model.loss
    return torch.compile(model.loss, mode=COMPILE_MODE[mode])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _config(model_name, attention, context, vocab, ckpt, **kw):
    return LongNetConfig.from_name(model_name, vocab_size=vocab, attention=attention, activation_checkpointing=ckpt,
                                   position="xpos" if attention == "dilated" or context <= 65536 else "rope", **kw)


def run(model_name, attention, context, tokens, vocab, steps, ckpt, mode, settings=None):
    cfg = _config(model_name, attention, context, vocab, ckpt, attention_settings=settings or {})
    row = dict(model=model_name, attention=attention, context=context, batch=max(1, tokens // context), ckpt=ckpt,
               mode=mode, settings=settings or {})
    return {**row, **run_config(cfg, context, tokens, steps, mode)}


def run_config(cfg: LongNetConfig, context, tokens, steps, mode) -> dict:
    """Step time, tokens/s, MFU and peak memory of ``cfg``'s model at ``context`` tokens (or ``error``)."""
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = LongNet(cfg).cuda()
    loss_fn = _loss_fn(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    bsz = max(1, tokens // context)
    idx = torch.randint(0, cfg.vocab_size, (bsz, context), device="cuda")
    last = {}
    breaks = _graph_breaks()

    def step():
        if _graphed(mode):
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(idx, idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach().clone()

    row = {}
    try:
        row["first_step_s"] = wall_s(step)  # compiles
        t = bench_ms(step, reps=steps, warmup=1) / 1e3  # CUDA-event median
    except torch.OutOfMemoryError:
        return {**row, "error": "OOM"}
    except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
        return {**row, "error": f"{type(e).__name__}: {e}"[:300]}
    tps = bsz * context / t
    return {**row, "step_s": t, "tokens_per_s": tps, "mfu": mfu(cfg.flops_per_token(context), tps),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(last["loss"]),
            "graph_breaks": _graph_breaks() - breaks}


def check(model_name, vocab, context, mode, settings=None, seed=0):
    """Relative L2 errors (loss, worst parameter gradient) of ``mode`` in bf16 against float64
    with the dense reference attention, same weights, same tokens."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    cfg = _config(model_name, "dilated", context, vocab, False, n_layer=2, attention_settings=settings or {})
    fast = LongNet(cfg).cuda()
    ref = LongNet(_config(model_name, "dilated", context, vocab, False, n_layer=2, attn_backend="reference")).cuda()
    ref.load_state_dict(fast.state_dict())
    ref.double()
    idx = torch.randint(0, vocab, (1, context), device="cuda")
    labels = idx.roll(-1, 1)
    labels[:, -1] = -100
    fn = _loss_fn(fast, mode)
    for _ in range(2 if _graphed(mode) else 1):  # CUDA graphs record on a later call
        if _graphed(mode):
            torch.compiler.cudagraph_mark_step_begin()
        fast.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(idx, labels)
        loss.backward()
    ref_loss = ref.loss(idx, labels)
    ref_loss.backward()
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    grads = {n: rel(p.grad, q.grad) for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters())}
    worst = max(grads, key=grads.get)
    return dict(mode=mode, context=context, loss=rel(loss.detach(), ref_loss.detach()), grad=grads[worst],
                worst_param=worst)


def main():
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125M")
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 131072, 1048576])
    ap.add_argument("--attention", nargs="*", default=["dilated", "dense"])
    ap.add_argument("--modes", nargs="*", default=["eager", "compiled"], choices=MODES)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens // context)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dense-max", type=int, default=131072)
    ap.add_argument("--ckpt-from", type=int, default=262144, help="activation checkpointing from this context")
    ap.add_argument("--check", action="store_true", help="check each mode against the float64 dense reference first")
    ap.add_argument("--check-context", type=int, default=4096)
    ap.add_argument("--settings", type=json.loads, default={},
                    help='attention settings as JSON, e.g. \'{"overlap": false}\' (AttentionSettings fields)')
    ap.add_argument("--json", default="train_throughput.json", help="where to write every row")
    args = ap.parse_args()
    require_cuda("benchmarks.train_throughput")
    checks, rows = [], []
    if args.check:
        for mode in args.modes:
            checks.append(check(args.model, args.vocab, args.check_context, mode, args.settings))
            print(json.dumps(checks[-1]), flush=True)
    for ctx in args.contexts:
        for att in args.attention:
            if att == "dense" and ctx > args.dense_max:
                continue
            for mode in args.modes:
                r = run(args.model, att, ctx, args.tokens, args.vocab, args.steps if ctx < 2**20 else 3,
                        ctx >= args.ckpt_from, mode, args.settings)
                rows.append(r)
                print(json.dumps(r), flush=True)
    with open(args.json, "w") as f:
        json.dump({"checks": checks, "rows": rows}, f, indent=1)
    if checks:
        print("\n| mode | check context | loss rel. L2 | worst gradient rel. L2 | parameter |\n|---|---|---|---|---|")
        for c in checks:
            print(f"| {c['mode']} | {c['context']:,} | {c['loss']:.2e} | {c['grad']:.2e} | {c['worst_param']} |")
    if args.settings:
        print(f"\nattention settings: {args.settings}")
    print("\n| model | attention | context | batch | act. ckpt | mode | step s | tokens/s | MFU | peak GiB | "
          "graph breaks | first step s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['model']} | {r['attention']} | {r['context']:,} | {r['batch']} | {r['ckpt']} | {r['mode']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | | |")
        else:
            print(f"{head} {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                  f"{r['peak_gib']:.1f} | {r['graph_breaks']} | {r['first_step_s']:.1f} |")


if __name__ == "__main__":
    main()
