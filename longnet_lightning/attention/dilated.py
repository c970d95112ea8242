"""Dilated attention (LongNet, Ding et al. 2023), exactly as docs/semantics.md defines it.

The engine runs a plan (:mod:`.plan`): kernel calls (:mod:`.kernels`) on the rows of one branch
and head offset, whose results are merged by their softmax denominators (paper Eq. 10), online,
into an accumulator: ``out += (out_i - out) * exp(lse_i - lse')``, ``lse' = logaddexp(lse, lse_i)``
(:mod:`.fused` moves the rows).

A first ``r = 1`` branch that is one plain view of the input is read in place, as one call in
each direction: its kernel's output *is* the accumulator and its gradients are dq, dk, dv, so
nothing is copied into fresh buffers (``AttentionSettings.split_first_backward`` trades that for
memory in the backward).
In the strided plan the merges run on a second CUDA stream beside the next kernel call
(:class:`.fused.Overlap`).

The backward does not differentiate through the merge weights: the merged attention is one
softmax over the multiset union of the branches' keys, so each branch's kernel backward, fed the
*merged* output and log-sum-exp, returns that branch's exact share of the gradient (as ring
attention does). Gradients are accumulated through the same views into dq, dk, dv.

Sequence parallelism (``group=``): each rank passes its contiguous chunk of one sequence. Segments
inside the chunk run as above; for a segment that spans ranks, every rank sends the selected K and
V rows it holds (already sparsified) to the ranks that need them, in one exchange per call, and
its queries attend to the gathered keys; the backward returns the key gradients to their owners
in one exchange. The exchange itself (a collective) comes from :mod:`longnet_lightning.distributed`.

On one process the engine runs as the registered operator ``torch.ops.longnet.dilated_attention``
(and its backward), so ``torch.compile`` traces a model through it as one graph; the
sequence-parallel path, with its collectives, stays eager (a graph break).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .fused import (Overlap, accumulate_view_, merge_view_, pack, packed_view, unpack_accumulate_,
                    unpack_merge_, use_triton)
from .kernels import BACKENDS, attend, attend_backward, select_kernel
from .pattern import DilationPattern, block_view, normalize_layout
from .plan import SequenceLayout, ShardPlan, lead_block, packed_plan, shard_plan, strided_plan, use_packed
from .reference import dilated_attention_reference
from .settings import AttentionSettings


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, N, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share [B, N, H] "
            "(and q, k the head dim): dilated attention is self-attention over one sequence"
        )
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Run:
    """What one call runs with: the pattern, the mask, the kernel, and how rows move."""

    def __init__(self, pattern: DilationPattern, causal: bool, scale: float, kernel, settings: AttentionSettings,
                 triton: bool):
        self.pattern, self.causal, self.scale, self.kernel = pattern, causal, scale, kernel
        self.settings, self.triton = settings, triton

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Where forward outputs are merged (see ``AttentionSettings.forward_acc``)."""
        if self.settings.forward_acc == "input" and dtype in (torch.float16, torch.bfloat16):
            return dtype
        return _accum_dtype(dtype)

    def accumulators(self, q: torch.Tensor, dv: int, covered: bool):
        """``out`` ``[B, N, H, Dv]`` and ``lse`` ``[B, N, H]``; zero / ``-inf`` unless a covering
        first branch writes every row."""
        bsz, n, h, _ = q.shape
        out = (torch.empty if covered else torch.zeros)(bsz, n, h, dv, dtype=self.out_dtype(q.dtype), device=q.device)
        lse = torch.empty((bsz, n, h), dtype=_accum_dtype(q.dtype), device=q.device)
        if not covered:
            lse.fill_(float("-inf"))
        return out, lse

    def overlap(self, x: torch.Tensor) -> Overlap:
        """Where the strided plan's merges run (``AttentionSettings.overlap``). The packed plan
        merges in line: its few calls are short, and on an H200 a second stream gained nothing there."""
        return Overlap(x.device, self.settings.overlap)

    def adopt_output(self, q, o, lo):
        """The first, covering call's kernel output ``o`` ``[Bt, L, H, Dv]`` as the accumulator
        ``[B, N, H, Dv]`` itself (no copy), when its layout and dtype allow; ``lse`` from ``lo``."""
        bsz, n, h, _ = q.shape
        if o.dtype != self.out_dtype(q.dtype) or not o.is_contiguous() or o.shape[0] * o.shape[1] != bsz * n:
            return None
        lse = torch.empty((bsz, n, h), dtype=_accum_dtype(q.dtype), device=q.device)
        lse.view(o.shape[:3]).copy_(lo.transpose(1, 2))
        return o.view(bsz, n, h, o.shape[-1]), lse

    # strided plan ------------------------------------------------------------------------------

    def block_forward(self, q, k, v, blk):
        """The kernel on one block's rows: ``(out [Bt, L, G, Dv], lse [Bt, G, L])``."""
        return self.kernel.forward(block_view(q, blk), block_view(k, blk), block_view(v, blk), self.causal, self.scale)

    def block_backward(self, dout, q, k, v, out, lse, blk):
        """The kernel backward on one block's rows, given the merged ``out`` and ``lse``."""
        return self.kernel.backward(block_view(dout, blk), block_view(q, blk), block_view(k, blk), block_view(v, blk),
                                    block_view(out, blk), block_view(lse, blk).transpose(1, 2), self.causal, self.scale)

    def blocks_forward(self, q, k, v, out, lse, blocks, first_covers: bool):
        with self.overlap(q) as side:
            for branch, blk in blocks:
                o_i, lse_i = self.block_forward(q, k, v, blk)
                side(lambda: merge_view_(block_view(out, blk), block_view(lse, blk), o_i, lse_i,
                                         first=branch == 0 and first_covers, triton=self.triton), o_i, lse_i)

    def blocks_backward(self, dout, q, k, v, out, lse, grads, blocks, first_covers: bool):
        with self.overlap(q) as side:
            for branch, blk in blocks:
                g = self.block_backward(dout, q, k, v, out, lse, blk)
                side(lambda: accumulate_view_([block_view(buf, blk) for buf in grads], g,
                                              first=branch == 0 and first_covers, triton=self.triton), *g)

    def strided_forward(self, q, k, v):
        """Merged output ``[B, N, H, Dv]`` (q's dtype) and log-sum-exp ``[B, N, H]`` (float32/64).
        Rows that no branch selects keep output 0 and ``lse = -inf``. A first branch that is one
        plain view runs as one call whose output becomes the accumulator."""
        blocks, first_covers = strided_plan(self.pattern, *q.shape[:3], self.settings.max_rows_per_call)
        lead = None if self.split_first(q, backward=False) else lead_block(self.pattern, *q.shape[:3])
        acc = None
        if lead is not None:
            o, lo = self.block_forward(q, k, v, lead)
            acc = self.adopt_output(q, o, lo)
        if acc is None:
            out, lse = self.accumulators(q, v.shape[-1], first_covers)
            if lead is not None:
                merge_view_(block_view(out, lead), block_view(lse, lead), o, lo, first=True, triton=self.triton)
        else:
            out, lse = acc
        if lead is not None:
            blocks = [(i, blk) for i, blk in blocks if i != 0]
        self.blocks_forward(q, k, v, out, lse, blocks, first_covers)
        return out.to(q.dtype), lse

    def split_first(self, q, backward: bool) -> bool:
        """Whether a covering first branch is cut into calls of ``max_rows_per_call`` like the
        others, instead of running as one call whose results are the accumulator (forward) or
        dq, dk, dv (backward): only when the kernel returns them in another dtype (they would be
        copied whole), or, backward, when ``settings.split_first_backward`` asks for it."""
        if backward:
            return self.settings.split_first_backward or self.kernel.grad_dtype(q.dtype) != q.dtype
        return self.out_dtype(q.dtype) != q.dtype

    def strided_backward(self, dout, q, k, v, out, lse):
        """Gradients w.r.t. ``q, k, v``, accumulated in the inputs' dtype in the returned tensors:
        the first call's own when it is the whole covering branch (:func:`_adopt_grads`)."""
        blocks, first_covers = strided_plan(self.pattern, *q.shape[:3], self.settings.max_rows_per_call)
        lead = lead_block(self.pattern, *q.shape[:3])
        if lead is not None and blocks and (blocks[0][1] == lead or not self.split_first(q, backward=True)):
            g = self.block_backward(dout, q, k, v, out, lse, lead)
            grads = _adopt_grads(g, (q, k, v))
            if grads is None:
                grads = _grad_buffers(q, k, v, zero=False)
                accumulate_view_([block_view(buf, lead) for buf in grads], g, first=True, triton=self.triton)
            blocks = [(i, blk) for i, blk in blocks if i != 0]  # the lead is all of branch 0
        else:
            grads = _grad_buffers(q, k, v, zero=not first_covers)
        self.blocks_backward(dout, q, k, v, out, lse, grads, blocks, first_covers)
        return grads

    # packed plan -------------------------------------------------------------------------------

    def _calls(self, q, backward: bool):
        return packed_plan(self.pattern, *q.shape[:3], self.settings.packed_fold, self.settings.max_rows_per_call,
                           self.split_first(q, backward))

    def _gather(self, call, xs, lse=None):
        """Kernel inputs ``[S, L, H, *]`` of one packed call (and its LSE ``[S, H, L]``): views of
        ``xs`` when the call is one ``r = 1`` chunk of whole segments, else gathered, each chunk
        into its slice of the batch."""
        if len(call) == 1:
            c = call[0][1]
            if c.is_view:
                return [packed_view(x, c) for x in xs], (None if lse is None else pack([], c, lse, triton=self.triton)[1])
            return pack(xs, c, lse, triton=self.triton)
        c0, segs = call[0][1], sum(c.segments for _, c in call)
        ys = [torch.empty(segs, c0.length, c0.heads, x.shape[-1], dtype=x.dtype, device=x.device) for x in xs]
        ly = None if lse is None else torch.empty(segs, c0.heads, c0.length, device=lse.device,
                                                  dtype=torch.promote_types(lse.dtype, torch.float32))
        for _, c, sl in _slices(call):
            pack(xs, c, lse, out=([y[sl] for y in ys], None if ly is None else ly[sl]), triton=self.triton)
        return ys, ly

    def packed_forward(self, q, k, v):
        """Causal dilated attention, packed plan: same results as :meth:`strided_forward`. A
        first call that is the whole covering branch, in place, gives the accumulator."""
        calls = self._calls(q, backward=False)
        lead = calls[0] if _whole_view(calls[0]) else None
        if lead is not None:
            calls = calls[1:]
            o, lo = self.kernel.forward(*self._gather(lead, (q, k, v))[0], True, self.scale)
        acc = None if lead is None else self.adopt_output(q, o, lo)
        out, lse = acc if acc is not None else self.accumulators(q, v.shape[-1], 1 in self.pattern.dilation_rates)
        if lead is not None and acc is None:
            unpack_merge_(out, lse, o, lo, lead[0][1], True, triton=self.triton)
        for call in calls:
            (qp, kp, vp), _ = self._gather(call, (q, k, v))
            o, lo = self.kernel.forward(qp, kp, vp, True, self.scale)
            for first, c, sl in _slices(call):
                unpack_merge_(out, lse, o[sl], lo[sl], c, first, triton=self.triton)
        return out.to(q.dtype), lse

    def packed_backward(self, dout, q, k, v, out, lse):
        """Gradients for :meth:`packed_forward`; padding slots get ``dout = 0`` and ``lse = +inf``,
        so they receive and send exactly zero gradient. Accumulated in the inputs' dtype."""
        calls = self._calls(q, backward=True)
        lead = calls[0] if _whole_view(calls[0]) else None
        if lead is not None:
            calls = calls[1:]
            (qp, kp, vp, op, dop), lp = self._gather(lead, (q, k, v, out, dout), lse)
            g = self.kernel.backward(dop, qp, kp, vp, op, lp, True, self.scale)
        grads = None if lead is None else _adopt_grads(g, (q, k, v))
        dq, dk, dv = grads if grads is not None else _grad_buffers(q, k, v, zero=1 not in self.pattern.dilation_rates)
        if lead is not None and grads is None:
            unpack_accumulate_((dq, dk, dv), g, lead[0][1], True, triton=self.triton)
        for call in calls:
            (qp, kp, vp, op, dop), lp = self._gather(call, (q, k, v, out, dout), lse)
            g = self.kernel.backward(dop, qp, kp, vp, op, lp, True, self.scale)
            for first, c, sl in _slices(call):
                unpack_accumulate_((dq, dk, dv), [t[sl] for t in g], c, first, triton=self.triton)
        return dq, dk, dv

    # sharded plan (sequence parallel) ----------------------------------------------------------

    @staticmethod
    def _keys(plan: ShardPlan, k, v, recv: torch.Tensor):
        """Per spanning call, its keys and values ``[B, Lk, G, D]``: this rank's own piece as a
        view, the others' from the received buffer (see :func:`_received`)."""
        got = _received(plan, recv, k, v)
        out = []
        for ci, call in enumerate(plan.calls):
            parts = [(block_view(k, p.block), block_view(v, p.block)) if pi == call.own else got[ci, pi]
                     for pi, p in enumerate(call.pieces)]
            out.append(tuple(torch.cat([x[t] for x in parts], 1) if len(parts) > 1 else parts[0][t] for t in (0, 1)))
        return out

    def sharded_forward(self, q, k, v, plan: ShardPlan, recv):
        out, lse = self.accumulators(q, v.shape[-1], covered=False)
        self.blocks_forward(q, k, v, out, lse, plan.local, first_covers=False)
        for call, (kg, vg) in zip(plan.calls, self._keys(plan, k, v, recv)):
            o_i, lse_i = attend(self.kernel, block_view(q, call.query), kg, vg, self.causal, self.scale)
            merge_view_(block_view(out, call.query), block_view(lse, call.query), o_i, lse_i, first=False,
                        triton=self.triton)
        return out.to(q.dtype), lse

    def sharded_backward(self, dout, q, k, v, out, lse, plan: ShardPlan, recv):
        """``dq, dk, dv`` of this rank's own rows, and the gradients of the received rows laid out
        like ``recv``, to be returned to their owners."""
        grads = _grad_buffers(q, k, v, zero=True)
        self.blocks_backward(dout, q, k, v, out, lse, grads, plan.local, first_covers=False)
        remote = {}
        for ci, (call, (kg, vg)) in enumerate(zip(plan.calls, self._keys(plan, k, v, recv))):
            qv = call.query
            dq_c, dk_c, dv_c = attend_backward(self.kernel, block_view(dout, qv), block_view(q, qv), kg, vg,
                                               block_view(out, qv), block_view(lse, qv).transpose(1, 2),
                                               self.causal, self.scale)
            accumulate_view_([block_view(grads[0], qv)], [dq_c], first=False, triton=self.triton)
            j = 0
            for pi, p in enumerate(call.pieces):
                part = dk_c[:, j:j + p.block.length], dv_c[:, j:j + p.block.length]
                j += p.block.length
                if pi == call.own:
                    accumulate_view_([block_view(grads[1], p.block), block_view(grads[2], p.block)], list(part),
                                     first=False, triton=self.triton)
                else:
                    remote[ci, pi] = part
        flat = [t.reshape(-1).to(k.dtype) for src in plan.receives for key in src for t in remote[key]]
        return grads, (torch.cat(flat) if flat else k.new_zeros(0))


def _grad_buffers(q, k, v, zero: bool):
    """dq, dk, dv, contiguous ``[B, N, H, D]`` whatever the inputs' layout (the PyTorch data
    movement views them flat); zero-filled unless a covering branch writes every row."""
    alloc = torch.zeros_like if zero else torch.empty_like
    return tuple(alloc(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _whole_view(call) -> bool:
    """A packed call that is the whole covering first branch, read in place."""
    first, c = call[0]
    return len(call) == 1 and first and c.is_view and c.s0 == 0 and c.s1 == c.bsz * c.nseg


def _adopt_grads(grads, like):
    """Kernel gradients of a call that covers every row once, as ``dq, dk, dv`` ``[B, N, H, *]``
    themselves (no copy), when each is contiguous in its input's dtype; else None."""
    if all(g.dtype == t.dtype and g.is_contiguous() and g.numel() == t.numel() for g, t in zip(grads, like)):
        return tuple(g.view(t.shape) for g, t in zip(grads, like))
    return None


def _slices(call):
    """``(first, chunk, slice of the call's batch)`` for each chunk of a packed call."""
    s = 0
    for first, c in call:
        yield first, c, slice(s, s + c.segments)
        s += c.segments


# Rows travel flattened: for each peer rank in rank order, each piece's K rows then its V rows.

def _piece_numel(p, k, v) -> tuple[int, int]:
    rows = p.block.bt * p.block.length * p.block.heads
    return rows * k.shape[-1], rows * v.shape[-1]


def _received(plan: ShardPlan, buf: torch.Tensor, k, v) -> dict:
    """``{(call, piece): (k rows, v rows)}`` ``[B, J, G, D]``, views of the received ``buf``."""
    got, at = {}, 0
    for keys in plan.receives:
        for ci, pi in keys:
            p = plan.calls[ci].pieces[pi]
            nk, nv = _piece_numel(p, k, v)
            shape = (p.block.bt, p.block.length, p.block.heads)
            got[ci, pi] = buf[at:at + nk].view(*shape, k.shape[-1]), buf[at + nk:at + nk + nv].view(*shape, v.shape[-1])
            at += nk + nv
    return got


def _recv_sizes(plan: ShardPlan, k, v) -> list[int]:
    """Elements received from each rank."""
    return [sum(sum(_piece_numel(plan.calls[ci].pieces[pi], k, v)) for ci, pi in keys) for keys in plan.receives]


def _send_buffer(plan: ShardPlan, k, v):
    """This rank's selected K and V rows that other ranks need, flattened, and the element count
    for each destination rank."""
    parts, sizes = [], []
    for pieces in plan.sends:
        n = 0
        for p in pieces:
            kb, vb = block_view(k, p.block), block_view(v, p.block)
            parts += [kb.reshape(-1), vb.reshape(-1)]
            n += kb.numel() + vb.numel()
        sizes.append(n)
    return (torch.cat(parts) if parts else k.new_zeros(0)), sizes


def _return_grads(plan: ShardPlan, dk, dv, back: torch.Tensor, triton: bool) -> None:
    """Add the gradients that came back for the rows this rank sent (layout of ``plan.sends``)."""
    at = 0
    for pieces in plan.sends:
        for p in pieces:
            kb, vb = block_view(dk, p.block), block_view(dv, p.block)
            nk, nv = kb.numel(), vb.numel()
            accumulate_view_([kb, vb], [back[at:at + nk].view(kb.shape), back[at + nk:at + nk + nv].view(vb.shape)],
                             first=False, triton=triton)
            at += nk + nv


def _like(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``dout`` in ``out``'s memory layout: cuDNN's attention backward returns wrong gradients
    when the output gradient's strides differ from the output's (seen on an H200, torch 2.11)."""
    return dout if dout.stride() == out.stride() else dout.contiguous()


# The single-process attention as a registered operator: ``torch.compile`` keeps it in the graph as
# one opaque call (shapes from the fake implementations), so whole models compile without a
# break, and autograd runs the backward operator. Only tensors and plain values cross the boundary:
# the pattern as two int lists, the settings as ``AttentionSettings.key()``.

def _run_of(q, segment_lengths, dilation_rates, causal, scale, backend, settings_key) -> _Run:
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    settings = AttentionSettings.from_key(settings_key)
    return _Run(pattern, causal, scale, select_kernel(backend, q, settings), settings, use_triton(q, settings))


@torch.library.custom_op("longnet::dilated_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int],
                  dilation_rates: list[int], causal: bool, scale: float, backend: str,
                  settings: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``[B, N, H, Dv]`` (q's dtype) and log-sum-exp ``[B, N, H]`` (float32/64)."""
    run = _run_of(q, segment_lengths, dilation_rates, causal, scale, backend, settings)
    q, k, v = normalize_layout(q), normalize_layout(k), normalize_layout(v)
    if use_packed(q, causal, run.settings, run.triton):
        return run.packed_forward(q, k, v)
    return run.strided_forward(q, k, v)


@_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, scale, backend, settings):
    b, n, h, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]), q.new_empty(b, n, h, dtype=_accum_dtype(q.dtype))


@torch.library.custom_op("longnet::dilated_attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, segment_lengths: list[int],
                           dilation_rates: list[int], causal: bool, scale: float, backend: str,
                           settings: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv``, contiguous, in the inputs' dtypes."""
    run = _run_of(q, segment_lengths, dilation_rates, causal, scale, backend, settings)
    q, k, v = normalize_layout(q), normalize_layout(k), normalize_layout(v)
    dout = _like(dout, out)
    packed = use_packed(q, causal, run.settings, run.triton)
    return tuple((run.packed_backward if packed else run.strided_backward)(dout, q, k, v, out, lse))


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, segment_lengths, dilation_rates, causal, scale, backend, settings):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return *_attention_backward_op(dout, q, k, v, out, lse, *ctx.args), *(None,) * len(ctx.args)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


class _ShardedAttentionFn(torch.autograd.Function):
    """One rank's chunk of sequence-parallel dilated attention: one exchange forward (K, V rows
    to the ranks that need them), one backward (their gradients back to their owners)."""

    @staticmethod
    def forward(ctx, q, k, v, run: _Run, plan: ShardPlan, exchange):
        send, send_sizes = _send_buffer(plan, k, v)
        recv_sizes = _recv_sizes(plan, k, v)
        recv = exchange(send, send_sizes, recv_sizes) if plan.communicates else send
        out, lse = run.sharded_forward(q, k, v, plan, recv)
        ctx.save_for_backward(q, k, v, out, lse, recv)
        ctx.run, ctx.plan, ctx.exchange, ctx.sizes = run, plan, exchange, (send_sizes, recv_sizes)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, recv = ctx.saved_tensors
        run, plan = ctx.run, ctx.plan
        (dq, dk, dv), back = run.sharded_backward(_like(dout, out), q, k, v, out, lse, plan, recv)
        if plan.communicates:
            send_sizes, recv_sizes = ctx.sizes
            _return_grads(plan, dk, dv, ctx.exchange(back, recv_sizes, send_sizes), run.triton)
        return dq, dk, dv, None, None, None


@torch.compiler.disable  # collectives and a per-call plan: a graph break, run eagerly
def _sharded(q, k, v, run: _Run, group, lengths):
    """``dilated_attention`` of one rank's chunk; ``lengths`` (every rank's chunk length) are
    exchanged, and the shapes checked to agree, when not given."""
    from ..distributed.sequence import RowExchange, exchange_lengths

    if lengths is None:
        lengths = exchange_lengths(group, q, v, run)
    layout = SequenceLayout(tuple(lengths), RowExchange.rank(group))
    if layout.lengths[layout.rank] != q.shape[1]:
        raise ValueError(f"lengths={list(layout.lengths)} give rank {layout.rank} {layout.lengths[layout.rank]} "
                         f"positions, but its chunk has {q.shape[1]}: pass every rank's chunk length in rank order")
    plan = shard_plan(run.pattern, layout, q.shape[2], q.shape[0], run.causal, run.settings.max_rows_per_call)
    exchange = RowExchange(group)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ShardedAttentionFn.apply(q, k, v, run, plan, exchange)
    send, send_sizes = _send_buffer(plan, k, v)
    recv = exchange(send, send_sizes, _recv_sizes(plan, k, v)) if plan.communicates else send
    return run.sharded_forward(q, k, v, plan, recv)[0]


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates=None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    settings: AttentionSettings | dict | None = None,
    group=None,
    lengths=None,
) -> torch.Tensor:
    """LongNet dilated attention of ``q, k, v`` ``[B, N, H, D]`` → ``[B, N, H, D]``.

    ``segment_lengths`` and ``dilation_rates`` give the branches ``(w_i, r_i)`` (or pass a
    :class:`DilationPattern` as ``segment_lengths``). Every head runs every branch with offset
    ``head mod r``; branches are mixed by their softmax denominators with exact gradients. Any
    ``N >= 1`` works, including ``N < w``, ``w % r != 0`` and ``H % r != 0``.

    ``backend``: ``auto`` (fastest that runs here), ``sdpa``, ``xformers``, ``torch`` (plain
    PyTorch, any device) or ``reference`` (dense ``N x N``, for tests and tiny inputs).
    ``settings``: :class:`AttentionSettings` (how it runs, never what it computes).

    ``group``: a ``torch.distributed`` process group over which one sequence is split. Each rank
    passes its contiguous chunk ``[B, N_local, H, D]`` (rank order = position order; lengths may
    differ) and gets its chunk of the output; outputs and gradients equal rows of the
    single-process result. ``lengths``: every rank's ``N_local`` in rank order, if known (saves
    one small collective that also checks that the ranks' shapes agree).
    """
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    _check_qkv(q, k, v)
    settings = AttentionSettings.of(settings)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' runs on one process: use another backend with group=")
        return dilated_attention_reference(q, k, v, pattern, causal=causal, scale=scale)
    if group is not None:
        if k.dtype != v.dtype:
            raise ValueError(f"k ({k.dtype}) and v ({v.dtype}) must share a dtype with group=: their rows travel together")
        run = _Run(pattern, causal, scale, select_kernel(backend, q, settings), settings, use_triton(q, settings))
        q, k, v = normalize_layout(q), normalize_layout(k), normalize_layout(v)
        return _sharded(q, k, v, run, group, lengths)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    return _attention_op(q, k, v, list(pattern.segment_lengths), list(pattern.dilation_rates), causal, scale,
                         backend, settings.key())[0]


class DilatedAttention(nn.Module):
    """:func:`dilated_attention` as a module: ``forward(q, k, v)`` on ``[B, N, H, D]``."""

    def __init__(self, segment_lengths, dilation_rates, causal: bool = True, scale: float | None = None,
                 backend: str = "auto", settings: AttentionSettings | dict | None = None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
        self.pattern = DilationPattern.of(segment_lengths, dilation_rates)
        self.causal, self.scale, self.backend = causal, scale, backend
        self.settings = AttentionSettings.of(settings)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, lengths=None) -> torch.Tensor:
        return dilated_attention(q, k, v, self.pattern, causal=self.causal, scale=self.scale, backend=self.backend,
                                 settings=self.settings, group=group, lengths=lengths)

    def extra_repr(self) -> str:
        return f"{self.pattern}, causal={self.causal}, backend={self.backend!r}"
