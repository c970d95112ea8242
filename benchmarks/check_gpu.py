"""GPU correctness check of every attention code path, against the float64 dense reference.

Run after any change to ``longnet_lightning/attention/`` on a CUDA machine:

    python -m benchmarks.check_gpu            # prints one table; exits 1 if a case fails

It checks, in bf16 and fp32 (relative L2 error of outputs and gradients against float64):
- rectangular blocks (``Lq < Lk``, offset causal mask) through every CUDA kernel: cuDNN, flash,
  memory-efficient, plain torch, and xformers where it runs;
- ``dilated_attention`` on awkward shapes, packed and strided plans, Triton and PyTorch data
  movement, and many small calls (the first branch whole, or its backward split);
- the strided plan's merges on a second CUDA stream (``overlap``) against the same merges in line,
  within the kernels' run-to-run noise;
- ``dilated_attention`` compiled (``torch.compile(fullgraph=True)``: the registered operator);
- the fused LM head + cross-entropy (Triton row passes) against float64;
- the fused GELU + sub-LayerNorm (Triton forward and backward) against float64;
- CUDA graphs in Lightning's loop (``LongNetLM(cuda_graphs=True)``): gradients accumulated over
  micro-batches against the same run without CUDA graphs and against a plain loop;
- sequence-parallel attention and a whole-model training step on two processes sharing the GPU
  (``gloo`` on CUDA tensors), against one process on the whole sequence.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.multiprocessing as mp

from longnet_lightning import DilationPattern, dilated_attention, dilated_attention_reference
from longnet_lightning.attention.kernels import KERNELS, attend, attend_backward
from longnet_lightning.attention.settings import FALLBACKS, AttentionSettings

from .common import require_cuda

BOUND = {torch.bfloat16: 2e-2, torch.float32: 2e-3}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _rand(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64).to(dtype)


def check_rectangular(rows):
    for name, settings in [("sdpa/cudnn", AttentionSettings()), ("sdpa/flash", AttentionSettings(sdpa_cuda="flash")),
                           ("torch", AttentionSettings()), ("xformers", AttentionSettings(xformers_force=True))]:
        kernel = KERNELS[name.partition("/")[0]](settings)
        for dtype in (torch.bfloat16, torch.float32):
            if kernel.supports(torch.zeros(1, 8, 1, 64, device="cuda", dtype=dtype)):
                rows.append((f"rect {name}", str(dtype)[6:], "-", "skipped: " + kernel.supports(
                    torch.zeros(1, 8, 1, 64, device="cuda", dtype=dtype))[:60], True))
                continue
            worst = 0.0
            for lq, lk, causal in [(384, 1024, True), (1000, 1000, True), (257, 2048, True), (300, 700, False)]:
                q = _rand((3, lq, 4, 64), torch.float64, lq).requires_grad_()
                k, v = (_rand((3, lk, 4, 64), torch.float64, lk + i).requires_grad_() for i in range(2))
                s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8
                if causal:
                    s = s.masked_fill(torch.arange(lk, device="cuda")[None] > torch.arange(lk - lq, lk, device="cuda")[:, None],
                                      float("-inf"))
                ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
                dout = torch.randn_like(ref)
                gref = torch.autograd.grad(ref, (q, k, v), dout)
                ql, kl, vl, dl = (t.detach().to(dtype) for t in (q, k, v, dout))
                out, lse = attend(kernel, ql, kl, vl, causal, 1 / 8)
                grads = attend_backward(kernel, dl, ql, kl, vl, out, lse, causal, 1 / 8)
                worst = max(worst, rel(out, ref), *(rel(g, r) for g, r in zip(grads, gref)))
            rows.append((f"rect {name}", str(dtype)[6:], "4 shapes", f"{worst:.2e}", worst < BOUND[dtype]))


CASES = [  # (B, N, H, D, ws, rs, causal)
    (1, 8192, 12, 64, [2048, 4096, 8192], [1, 2, 4], True),
    (2, 3001, 7, 64, [512, 1000, 3000], [1, 3, 7], True),
    (1, 5000, 6, 64, [1024, 2048], [1, 5], False),
    (3, 777, 5, 32, [128, 1024], [1, 6], True),
    (2, 4096, 12, 48, [512, 1024, 2048, 4096, 8192], [1, 2, 4, 6, 12], True),  # the 24M model's heads
]


# How check_single runs each plan: Triton or PyTorch data movement; and many small calls, where
# the covering r = 1 branch is one call anyway (its backward too, unless split).
VARIANTS = [("triton auto", {}), ("triton off", dict(triton="off")),
            ("calls of 2^12 rows", dict(max_rows_per_call=2**12)),
            ("calls of 2^12 rows, first backward split", dict(max_rows_per_call=2**12, split_first_backward=True))]


def check_single(rows):
    for dtype in (torch.bfloat16, torch.float32):
        for plan in ("packed", "strided"):
            for label, variant in VARIANTS:
                settings = AttentionSettings(packed_max_tokens=2**62 if plan == "packed" else 0, **variant)
                worst = 0.0
                for i, (b, n, h, d, ws, rs, causal) in enumerate(CASES):
                    if plan == "packed" and not causal:
                        continue
                    q, k, v = (_rand((b, n, h, d), torch.float64, 10 * i + j).requires_grad_() for j in range(3))
                    ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=causal)
                    dout = torch.randn_like(ref)
                    gref = torch.autograd.grad(ref, (q, k, v), dout)
                    ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
                    out = dilated_attention(ql, kl, vl, ws, rs, causal=causal, settings=settings)
                    grads = torch.autograd.grad(out, (ql, kl, vl), dout.to(dtype))
                    # the same with heads-major inputs and output gradient (views of [B, H, N, D])
                    hm = [t.detach().to(dtype).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                          for t in (q, k, v)]
                    out2 = dilated_attention(*hm, ws, rs, causal=causal, settings=settings)
                    grads2 = torch.autograd.grad(out2, hm, dout.to(dtype).transpose(1, 2).contiguous().transpose(1, 2))
                    worst = max(worst, rel(out, ref), rel(out2, ref), *(rel(g, r) for g, r in zip(grads, gref)),
                                *(rel(g, r) for g, r in zip(grads2, gref)))
                rows.append((f"dilated {plan}, {label}", str(dtype)[6:], f"{len(CASES)} shapes", f"{worst:.2e}",
                             worst < BOUND[dtype]))


def check_overlap(rows):
    """The strided plan's merges on a second stream (``overlap``, the default) give the results of
    running them in line, including many-call plans where the side stream lags: bit for bit
    when the kernels are deterministic, else within the rounding noise of two runs in line
    (relative L2 of the output and the gradients)."""
    from longnet_lightning.model import PATTERNS

    paper = [list(p) for p in PATTERNS["paper"]]
    cases = [(1, 32768, 12, 64, *paper), (4, 8192, 12, 64, *paper), (1, 262144, 12, 64, *paper),
             (2, 3001, 7, 64, [512, 1000, 3000], [1, 3, 7]), (1, 65536, 12, 64, *paper)]
    for b, n, h, d, ws, rs in cases:
        q, k, v = (_rand((b, n, h, d), torch.bfloat16, 70 + j).requires_grad_() for j in range(3))
        dout = _rand((b, n, h, d), torch.bfloat16, 80)
        got = []
        for overlap in (False, False, True):
            s = AttentionSettings(packed_max_tokens=0, overlap=overlap,
                                  max_rows_per_call=2**19 if n < 2**18 else 2**16)
            out = dilated_attention(q, k, v, ws, rs, settings=s)
            got.append([out.detach(), *torch.autograd.grad(out, (q, k, v), dout)])
        diff = lambda x, y: max(rel(a, c) for a, c in zip(x, y))  # noqa: E731 - output and dq, dk, dv
        noise, worst = diff(got[1], got[0]), diff(got[2], got[0])
        # a race (a merge reading rows not yet written, or memory reused under it) moves whole rows:
        # far above the rounding noise of the kernels' atomics, which is all two runs in line differ by
        rows.append(("overlap on vs off, strided plan", "bf16", f"B={b} N={n}",
                     f"{worst:.1e} (off vs off {noise:.1e})", worst <= max(4 * noise, 1e-4)))


def check_compiled(rows):
    """``dilated_attention`` inside ``torch.compile(fullgraph=True)``: no graph break, and the
    same results as eager (both against float64)."""
    b, n, h, d, ws, rs, causal = CASES[0]
    fn = torch.compile(lambda q, k, v: dilated_attention(q, k, v, ws, rs, causal=causal) * 1.0, fullgraph=True)
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (_rand((b, n, h, d), torch.float64, 50 + j).requires_grad_() for j in range(3))
        ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=causal)
        dout = torch.randn_like(ref)
        gref = torch.autograd.grad(ref, (q, k, v), dout)
        ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = fn(ql, kl, vl)
        grads = torch.autograd.grad(out, (ql, kl, vl), dout.to(dtype))
        worst = max(rel(out, ref), *(rel(g, r) for g, r in zip(grads, gref)))
        rows.append(("dilated, torch.compile fullgraph", str(dtype)[6:], f"N={n}", f"{worst:.2e}", worst < BOUND[dtype]))


def check_loss(rows):
    """The fused LM head + cross-entropy, Triton row passes, against float64: per token, and summed."""
    from longnet_lightning.loss import linear_cross_entropy

    for dtype in (torch.bfloat16, torch.float32):
        worst = worst_sum = 0.0
        for t, e, vocab, chunk in [(8192, 768, 32768, 4096), (1000, 64, 257, 300), (513, 128, 50257, 128)]:
            h = _rand((1, t, e), torch.float64, t)
            w = _rand((vocab, e), torch.float64, vocab) * e ** -0.5
            y = torch.randint(0, vocab, (1, t), device="cuda")
            y[0, ::7] = -100
            g = torch.rand(1, t, device="cuda", dtype=torch.float64)
            hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
            ref = torch.nn.functional.cross_entropy((hr @ wr.t())[0], y[0], reduction="none")[None]
            gref = torch.autograd.grad((ref * g).sum(), (hr, wr), retain_graph=True)
            hf, wf = h.to(dtype).requires_grad_(), w.float().requires_grad_()
            nll = linear_cross_entropy(hf, wf, y, chunk)
            grads = torch.autograd.grad((nll * g.float()).sum(), (hf, wf))
            worst = max(worst, rel(nll, ref), *(rel(a, b) for a, b in zip(grads, gref)))
            # the summed loss: its gradients computed in the forward, scaled in the backward
            sref = torch.autograd.grad(ref.sum() / 3, (hr, wr))
            total = linear_cross_entropy(hf, wf, y, chunk, reduction="sum")
            grads = torch.autograd.grad(total / 3, (hf, wf))
            worst_sum = max(worst_sum, rel(total, ref.sum()), *(rel(a, b) for a, b in zip(grads, sref)))
        rows.append(("fused LM head + cross-entropy", str(dtype)[6:], "3 shapes", f"{worst:.2e}", worst < BOUND[dtype]))
        rows.append(("fused LM head + cross-entropy, summed", str(dtype)[6:], "3 shapes", f"{worst_sum:.2e}",
                     worst_sum < BOUND[dtype]))


def check_gelu_norm(rows):
    """The fused GELU + sub-LN (Triton forward and backward), with and without fc1's bias folded in,
    against float64 on the same inputs."""
    import torch.nn.functional as F

    from longnet_lightning.gelu_norm import gelu_layer_norm

    for dtype in (torch.bfloat16, torch.float32):
        worst = 0.0
        for i, (m, f) in enumerate([(32768, 3072), (1000, 3072), (777, 1000), (3, 5), (4096, 4096)]):
            h = (_rand((m, f), torch.float64, m + f) * 2).to(dtype)
            w, b = 1 + 0.3 * _rand((f,), torch.float64, f), 0.3 * _rand((f,), torch.float64, f + 1)
            ib = 0.3 * _rand((f,), torch.float64, f + 2) if i % 2 == 0 else None
            dy = _rand((m, f), torch.float64, m).to(dtype)
            ref_in = [t.double().requires_grad_() for t in (h, w, b) + (() if ib is None else (ib,))]
            x = ref_in[0] if ib is None else ref_in[0] + ref_in[3]
            ref = F.layer_norm(F.gelu(x), (f,), ref_in[1], ref_in[2], 1e-5)
            gref = torch.autograd.grad(ref, ref_in, dy.double())
            ins = [h.requires_grad_()] + [t.detach().float().requires_grad_() for t in ref_in[1:]]
            y = gelu_layer_norm(*ins[:3], in_bias=ins[3] if ib is not None else None)
            grads = torch.autograd.grad(y, ins, dy)
            worst = max(worst, rel(y, ref), *(rel(a, c) for a, c in zip(grads, gref)))
        ok = worst < BOUND[dtype] and FALLBACKS.triton is None
        rows.append(("fused GELU + sub-LN (fwd, dh, dw, db, d fc1 bias)", str(dtype)[6:], "5 shapes",
                     f"{worst:.2e}", ok))


def _on_ranks(fn, world: int, *args):
    """``[fn(rank, world, *args) for every rank]``, each rank its own process on this GPU, joined
    by gloo (which runs its collectives on CUDA tensors); a string (the first error) if one fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "s"), results, fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        for _ in range(world):
            rank, status, value = results.get(timeout=300)
            if status != "ok":
                print(value, file=sys.stderr)
                return value.splitlines()[0][:80]
            got[rank] = torch.load(io.BytesIO(value), weights_only=True)
        for p in procs:
            p.join(timeout=30)
    return [got[r] for r in range(world)]


def _worker(rank, world, store, results, fn, args):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        buf = io.BytesIO()  # as bytes: shared-memory handles would die with this process
        torch.save(fn(rank, world, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001
        results.put((rank, "error", f"{e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _sp_ranks(rank, world):
    import torch.distributed as dist

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for i, (b, n, h, d, ws, rs, causal) in enumerate(CASES):
            q, k, v, dout = (_rand((b, n, h, d), torch.float64, 10 * i + j) for j in range(4))
            lengths = [len(t) for t in torch.tensor_split(torch.arange(n), world)]
            a = sum(lengths[:rank])
            sl = slice(a, a + lengths[rank])
            ql, kl, vl = (t[:, sl].to(dtype).contiguous().requires_grad_() for t in (q, k, v))
            o = dilated_attention(ql, kl, vl, ws, rs, causal=causal, group=dist.group.WORLD)
            grads = torch.autograd.grad(o, (ql, kl, vl), dout[:, sl].to(dtype))
            out.append((o.detach().cpu(), *(g.cpu() for g in grads)))
    return out


def check_sequence_parallel(rows, world=2):
    got = _on_ranks(_sp_ranks, world)
    if isinstance(got, str):
        rows.append(("sequence parallel", "-", f"{world} procs", "FAILED: " + got, False))
        return
    at = 0
    for dtype in (torch.bfloat16, torch.float32):
        worst = worst_same = 0.0
        for i, (b, n, h, d, ws, rs, causal) in enumerate(CASES):
            q, k, v, dout = (_rand((b, n, h, d), torch.float64, 10 * i + j) for j in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=causal)
            gref = torch.autograd.grad(ref, (q, k, v), dout)
            ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
            one = dilated_attention(ql, kl, vl, ws, rs, causal=causal, settings=AttentionSettings(packed_max_tokens=0))
            gone = torch.autograd.grad(one, (ql, kl, vl), dout.to(dtype))
            full = [torch.cat([got[r][at][j] for r in range(world)], 1).cuda() for j in range(4)]
            e_sp = [rel(x, y) for x, y in zip(full, (ref, *gref))]
            e_one = [rel(x, y) for x, y in zip((one, *gone), (ref, *gref))]
            e_same = [rel(x, y) for x, y in zip(full, (one, *gone))]
            print(f"sequence parallel {dtype} case {i}: vs float64 {e_sp}, one process vs float64 {e_one}, "
                  f"vs one process {e_same}")
            worst, worst_same = max(worst, *e_sp), max(worst_same, *e_same)
            at += 1
        rows.append((f"sequence parallel, {world} procs vs float64", str(dtype)[6:], f"{len(CASES)} shapes",
                     f"{worst:.2e}", worst < BOUND[dtype]))
        rows.append((f"sequence parallel vs 1 proc (strided, {str(dtype)[6:]})", str(dtype)[6:], f"{len(CASES)} shapes",
                     f"{worst_same:.2e}", worst_same < BOUND[dtype]))


def time_paper_pattern(rows):
    """Median fwd+bwd ms of the paper pattern at 32K and 1M tokens (bf16, 12 x 64, causal)."""
    from longnet_lightning.model import PATTERNS

    ws, rs = PATTERNS["paper"]
    for n in (32768, 1048576):
        q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        times = {}
        for phase in ("fwd", "fwd+bwd"):
            ms = []
            for _ in range(7):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = dilated_attention(q, k, v, ws, rs)
                if phase == "fwd+bwd":
                    torch.autograd.grad(out, (q, k, v), dout)
                b.record()
                torch.cuda.synchronize()
                ms.append(a.elapsed_time(b))
            times[phase] = sorted(ms[2:])[len(ms[2:]) // 2]
        rows.append((f"time paper pattern N={n}", "bf16", "median of 5", f"fwd {times['fwd']:.2f} ms, "
                     f"fwd+bwd {times['fwd+bwd']:.2f} ms", True))
        del q, k, v, dout, out


def _model_ranks(rank, world, n):
    import torch.distributed as dist

    from longnet_lightning import LongNet, LongNetConfig

    return _model_step(LongNetConfig, LongNet, n, rank, world, dist.group.WORLD)


def _model_step(config_cls, model_cls, n, rank=0, world=1, group=None):
    """NLL sum of one 125M step (bf16 autocast) on this rank's chunk and a few gradients."""
    torch.manual_seed(0)
    model = model_cls(config_cls.from_name("125M", vocab_size=256)).cuda()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (1, n), generator=g).cuda()
    lengths = [len(t) for t in torch.tensor_split(torch.arange(n), world)]
    a = sum(lengths[:rank])
    x = idx[:, a:a + lengths[rank]]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        nll = model.loss(x, torch.roll(idx, -1, 1)[:, a:a + lengths[rank]], reduction="sum", group=group)
    nll.backward()
    picks = ("embed.weight", "blocks.0.attn.k_proj.weight", "blocks.11.attn.v_proj.weight", "blocks.11.ffn.fc2.weight")
    grads = {k: p.grad.float().cpu() for k, p in model.named_parameters() if k in picks}
    return nll.detach().float().cpu(), grads


def check_model_step(rows, world=2, n=49152):
    """A 125M step split over 2 processes on this GPU (chunks of 24K: the paper pattern's 32K
    segments span them) against one process on the whole 48K sequence."""
    from longnet_lightning import LongNet, LongNetConfig

    got = _on_ranks(_model_ranks, world, n)
    if isinstance(got, str):
        rows.append(("125M step, 2 procs", "bf16", "-", "FAILED: " + got, False))
        return
    loss, grads = _model_step(LongNetConfig, LongNet, n)
    sp_loss = sum(got[r][0] for r in range(world))
    e = [abs(sp_loss.item() - loss.item()) / abs(loss.item())]
    for k, gref in grads.items():
        e.append(rel(sum(got[r][1][k] for r in range(world)), gref))
    print(f"125M step: loss {loss.item():.6g} (1 proc) vs {sp_loss.item():.6g} (2 procs), grad rel errors {e[1:]}")
    rows.append(("125M step (loss, 4 grads), 2 procs vs 1", "bf16", f"N={n}", f"{max(e):.2e}", max(e) < 2e-2))


def _lightning_lm(graphs: bool | None):
    """The LongNetLM of check_graphs: CUDA graphs (True), compiled only (False) or eager (None)."""
    from longnet_lightning import LongNetLM

    torch.manual_seed(0)
    return LongNetLM(model="125M", vocab_size=256, overrides={"n_layer": 2}, compile=graphs is not None,
                     cuda_graphs=bool(graphs), warmup_steps=0, lr=1e-3)


def _grads_in_lightning(graphs: bool, batches, keep_buffers: bool = True):
    """The initial weights, and the accumulated gradients at each optimizer step, of a compiled
    2-layer 125M-wide LongNetLM in Lightning's loop (bf16-mixed, 4 micro-batches per step), with or
    without CUDA graphs; ``keep_buffers=False`` leaves out what makes CUDA graphs safe there."""
    import lightning as L

    seen, start, val = [], {}, []

    class Grads(L.Callback):
        def on_train_start(self, trainer, module):
            start.update({k: v.detach().clone() for k, v in module.state_dict().items()})

        def on_before_optimizer_step(self, trainer, module, optimizer):  # before clipping
            seen.append({k: p.grad.detach().float().clone() for k, p in module.named_parameters()})

        def on_validation_epoch_end(self, trainer, module):
            val.append(float(trainer.callback_metrics["val/loss"]))

    lm = _lightning_lm(graphs)
    if not keep_buffers:
        lm.on_train_batch_start = lambda *a: None
        lm.optimizer_zero_grad = lambda epoch, batch_idx, opt: opt.zero_grad(set_to_none=True)
    # validation after every 4 micro-batches: the loop switches between training and evaluation graphs
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=len(batches) // 4,
                        accumulate_grad_batches=4, gradient_clip_val=2.0, val_check_interval=4, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Grads()])
    torch._dynamo.reset()
    loader = lambda bs: torch.utils.data.DataLoader(bs, batch_size=None)  # noqa: E731
    trainer.fit(lm, train_dataloaders=loader(batches), val_dataloaders=loader(batches[:2]))
    return seen, start, val


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def check_graphs(rows, n=8192, steps=3):
    """CUDA graphs in Lightning's loop: each optimizer step's gradients (4 micro-batches summed)
    equal those of the same compiled run without CUDA graphs, and the first step's those of a
    plain eager loop over the same micro-batches from the same weights."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": x, "labels": torch.roll(x, -1, 1)} for x in
               (torch.randint(0, 256, (1, n), generator=g) for _ in range(4 * steps))]
    skips = counters["inductor"]["cudagraph_skips"]
    graphs, start, val_graphs = _grads_in_lightning(True, batches)
    skipped = counters["inductor"]["cudagraph_skips"] - skips
    compiled, _, val_compiled = _grads_in_lightning(False, batches)
    worst = max(rel(_flat(a), _flat(b)) for a, b in zip(graphs, compiled))
    rows.append(("Lightning, CUDA graphs vs compiled, accumulated", "bf16", f"{steps} steps, N={n}",
                 f"{worst:.2e}" + (f" ({skipped} graph skips)" if skipped else ""),
                 worst < 1e-2 and len(graphs) == len(compiled) == steps and not skipped))
    val_err = max(abs(a - b) / abs(b) for a, b in zip(val_graphs, val_compiled))
    rows.append(("Lightning, CUDA graphs vs compiled, val loss", "bf16", f"{len(val_graphs)} validations",
                 f"{val_err:.2e}", val_err < 1e-3 and len(val_graphs) == len(val_compiled) == steps))
    ref = _lightning_lm(None)  # eager, by hand: Lightning's loss over 4 accumulated batches
    ref.configure_model()
    ref.load_state_dict(start)
    ref.cuda()
    for b in batches[:4]:
        b = {k: v.cuda() for k, v in b.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ref.token_nll(b, reduction="sum") / (b["labels"] != -100).sum()
        (loss / 4).backward()
    err = rel(_flat(graphs[0]), _flat({k: p.grad.float() for k, p in ref.named_parameters()}))
    rows.append(("Lightning, CUDA graphs vs eager loop, step 1", "bf16", f"N={n}", f"{err:.2e}",
                 err < BOUND[torch.bfloat16]))
    try:
        control, _, _ = _grads_in_lightning(True, batches, keep_buffers=False)
        what = f"{max(rel(_flat(a), _flat(b)) for a, b in zip(control, compiled)):.2e}"
    except Exception as e:  # noqa: BLE001 - the failure this control may meet
        what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:60]}"
    print("control, CUDA graphs without kept gradient buffers:", what)
    rows.append(("Lightning, CUDA graphs, no kept buffers (info)", "bf16", f"N={n}", what, True))


def main(argv=None) -> int:
    checks = {f.__name__: f for f in (check_rectangular, check_single, check_overlap, check_compiled, check_loss,
                                      check_gelu_norm, check_graphs, check_sequence_parallel, check_model_step,
                                      time_paper_pattern)}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(checks), help="run only these checks (default: all)")
    args = p.parse_args(argv)
    require_cuda("benchmarks.check_gpu")
    warnings.simplefilter("ignore")
    rows: list[tuple] = []
    for check in (checks[n] for n in (args.only or checks)):
        try:
            check(rows)
        except Exception as e:  # noqa: BLE001 - report and go on with the other checks
            traceback.print_exc()
            rows.append((check.__name__, "-", "-", f"ERROR {type(e).__name__}: {str(e)[:80]}", False))
    print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name()}, fallbacks: triton={FALLBACKS.triton}, "
          f"cudnn={FALLBACKS.cudnn}")
    print(f"| {'check':<48} | dtype | cases | max rel. error | ok |\n|---|---|---|---|---|")
    for name, dt, cases, err, ok in rows:
        print(f"| {name:<48} | {dt} | {cases} | {err} | {'yes' if ok else 'NO'} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
