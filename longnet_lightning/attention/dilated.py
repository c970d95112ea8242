"""Dilated attention (LongNet, Ding et al. 2023), exactly as SPEC.md defines it.

For every branch ``(w, r)`` and every head offset ``o``, one kernel call attends inside the
selected rows (strided views, see :mod:`.pattern`). Branch results are merged by their softmax
denominators (paper Eq. 10), online, into an accumulator (see ``FORWARD_ACC``):
``out += (out_i - out) * sigmoid(lse_i - lse)``, ``lse = logaddexp(lse, lse_i)``.

The backward does not differentiate through the merge weights: the merged attention is one
softmax over the multiset union of the branches' keys, so each branch's kernel backward, fed the
*merged* output and log-sum-exp, returns that branch's exact share of the gradient (as ring
attention does). Gradients are accumulated through the same views into dq, dk, dv.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn

from .kernels import BACKENDS, select_kernel
from .fused import Chunk, accumulate_view_, chunks, merge_view_, pack, packed_view, unpack_accumulate_, unpack_merge_, use_triton
from .pattern import DilationPattern, block_view, normalize_layout, plan_branch, split_block
from .reference import dilated_attention_reference


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


# Where half-precision forward outputs are merged: "input" (each merge is computed in float32 and
# rounded to bf16/fp16, like the gradients) or "float32" (one rounding, at the end, but twice the
# memory traffic). On an H200 at 1M tokens "input" takes the forward from 25.8 to 20.9 ms, and
# the error against the float64 reference moves from 3.3e-3 to at most 3.4e-3 (RESULTS.md).
FORWARD_ACC = os.environ.get("LONGNET_FORWARD_ACC", "input")
if FORWARD_ACC not in ("input", "float32"):
    raise ValueError(f"LONGNET_FORWARD_ACC={FORWARD_ACC!r}: use 'input' (default) or 'float32'")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    if FORWARD_ACC == "input" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return _accum_dtype(dtype)


# Rows x heads per kernel call: bounds the transient per-call outputs (64 MiB per bf16 tensor
# at head dim 64) whatever N is, so the gradients cost almost nothing beyond dq, dk, dv.
MAX_ROWS_PER_CALL = 2**19


def _branches(pattern: DilationPattern) -> list[tuple[int, int]]:
    return sorted(pattern.branches, key=lambda b: b[1] != 1)  # stable: r = 1 first


def _plan(pattern: DilationPattern, q: torch.Tensor):
    """Kernel calls in merge order, and whether the first branch covers every row (``r = 1``).

    An ``r = 1`` branch goes first: it selects every (position, head) exactly once, so its
    results are written, not merged, and the accumulators need no initialisation.
    """
    bsz, n, h, _ = q.shape
    return _strided_plan(pattern, bsz, n, h, MAX_ROWS_PER_CALL)


@functools.lru_cache(maxsize=64)  # the plan depends on shapes only: built once per (pattern, shape)
def _strided_plan(pattern: DilationPattern, bsz: int, n: int, h: int, max_rows: int):
    branches = _branches(pattern)
    plan = []
    for i, (w, r) in enumerate(branches):
        for blk in plan_branch(n, h, w, r, bsz):
            plan += [(i, sub) for sub in split_block(blk, max_rows)]
    return tuple(plan), branches[0][1] == 1


def dilated_forward(q, k, v, pattern: DilationPattern, causal: bool, scale: float, kernel):
    """Merged output ``[B, N, H, Dv]`` (q's dtype) and log-sum-exp ``[B, N, H]`` (float32/64).

    Rows that no branch selects keep output 0 and ``lse = -inf``.
    """
    bsz, n, h, _ = q.shape
    plan, first_covers = _plan(pattern, q)
    alloc = torch.empty if first_covers else torch.zeros
    out = alloc(bsz, n, h, v.shape[-1], dtype=_out_dtype(q.dtype), device=q.device)
    lse = torch.empty((bsz, n, h), dtype=_accum_dtype(q.dtype), device=q.device)
    if not first_covers:
        lse.fill_(float("-inf"))
    for branch, blk in plan:
        o_i, lse_i = kernel.forward(block_view(q, blk), block_view(k, blk), block_view(v, blk), causal, scale)
        merge_view_(block_view(out, blk), block_view(lse, blk), o_i, lse_i, first=branch == 0 and first_covers)
    return out.to(q.dtype), lse


def dilated_backward(dout, q, k, v, out, lse, pattern: DilationPattern, causal, scale, kernel):
    """Gradients of the merged attention w.r.t. ``q, k, v`` (each ``[B, N, H, D]``).

    Accumulated in the inputs' dtype, directly in the returned tensors (no float32 copies).
    """
    plan, first_covers = _plan(pattern, q)
    alloc = torch.empty_like if first_covers else torch.zeros_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    for branch, blk in plan:
        grads = kernel.backward(
            block_view(dout, blk), block_view(q, blk), block_view(k, blk), block_view(v, blk),
            block_view(out, blk), block_view(lse, blk).transpose(1, 2), causal, scale,
        )
        accumulate_view_([block_view(buf, blk) for buf in (dq, dk, dv)], grads, first=branch == 0 and first_covers)
    return dq, dk, dv


# Packed plan: each branch gathered into [S, L, H, D] blocks of whole segments (see .fused), one
# kernel call per block for all heads, merged back by index arithmetic. Few large launches: fastest
# for short and medium N; long sequences use the copy-free strided plan.
PACKED_MAX_TOKENS = int(os.environ.get("LONGNET_PACKED_MAX_TOKENS", 2**17))  # crossover measured on an H200


def use_packed(q: torch.Tensor, causal: bool) -> bool:
    """Packed plan for causal attention on up to ``PACKED_MAX_TOKENS`` tokens (B x N).

    Its padded rows are harmless only under a causal mask (they are the last rows of their
    segment). Without Triton its CUDA merges use index ops, so deterministic mode then keeps the
    strided plan.
    """
    if not causal or (q.is_cuda and torch.are_deterministic_algorithms_enabled() and not use_triton(q)):
        return False
    return q.shape[0] * q.shape[1] <= PACKED_MAX_TOKENS


# Whole branches whose packed blocks have the same length L share one kernel call, their
# segments stacked along the batch (the paper pattern at 32K: 5 calls become 2).
FOLD_EQUAL_LENGTHS = os.environ.get("LONGNET_PACKED_FOLD", "1") != "0"


def _packed_calls(pattern: DilationPattern, q: torch.Tensor) -> tuple[tuple[tuple[bool, Chunk], ...], ...]:
    """Kernel calls of the packed plan, in merge order: each a list of ``(first, chunk)``.

    ``first`` marks chunks of the first branch when it covers every row (``r = 1``): they are
    written, not merged, so they lead the first call. Chunks that are whole branches are folded
    with earlier ones of the same length (see ``FOLD_EQUAL_LENGTHS``).
    """
    bsz, n, h, _ = q.shape
    return _packed_plan(pattern, bsz, n, h, MAX_ROWS_PER_CALL, FOLD_EQUAL_LENGTHS)


@functools.lru_cache(maxsize=64)
def _packed_plan(pattern: DilationPattern, bsz: int, n: int, h: int, max_rows: int, fold: bool):
    covered = 1 in pattern.dilation_rates
    calls, by_length = [], {}
    for i, (w, r) in enumerate(_branches(pattern)):
        for c in chunks(bsz, n, h, w, r, max_rows):
            item = (i == 0 and covered, c)
            whole = c.s0 == 0 and c.s1 == bsz * c.nseg
            if fold and whole and c.length in by_length:
                by_length[c.length].append(item)
                continue
            calls.append([item])
            if whole:
                by_length.setdefault(c.length, calls[-1])
    return tuple(tuple(call) for call in calls)


def _gather(call, xs, lse=None):
    """Kernel inputs ``[S, L, H, *]`` of one packed call (and its LSE ``[S, H, L]``): views of
    ``xs`` when the call is one ``r = 1`` chunk of whole segments, else gathered, each chunk into
    its slice of the batch."""
    if len(call) == 1:
        c = call[0][1]
        if c.is_view:
            return [packed_view(x, c) for x in xs], (None if lse is None else pack([], c, lse)[1])
        return pack(xs, c, lse)
    c0, segs = call[0][1], sum(c.segments for _, c in call)
    ys = [torch.empty(segs, c0.length, c0.heads, x.shape[-1], dtype=x.dtype, device=x.device) for x in xs]
    ly = None if lse is None else torch.empty(segs, c0.heads, c0.length, device=lse.device,
                                              dtype=torch.promote_types(lse.dtype, torch.float32))
    for _, c, sl in _slices(call):
        pack(xs, c, lse, out=([y[sl] for y in ys], None if ly is None else ly[sl]))
    return ys, ly


def _slices(call):
    """``(first, chunk, slice of the call's batch)`` for each chunk of a packed call."""
    s = 0
    for first, c in call:
        yield first, c, slice(s, s + c.segments)
        s += c.segments


def packed_forward(q, k, v, pattern: DilationPattern, scale: float, kernel):
    """Causal dilated attention, packed plan: same results as :func:`dilated_forward`."""
    bsz, n, h, _ = q.shape
    covered = 1 in pattern.dilation_rates
    out = (torch.empty if covered else torch.zeros)(bsz, n, h, v.shape[-1], dtype=_out_dtype(q.dtype), device=q.device)
    lse = torch.empty((bsz, n, h), dtype=_accum_dtype(q.dtype), device=q.device)
    if not covered:
        lse.fill_(float("-inf"))
    for call in _packed_calls(pattern, q):
        (qp, kp, vp), _ = _gather(call, (q, k, v))
        o, lo = kernel.forward(qp, kp, vp, True, scale)
        for first, c, sl in _slices(call):
            unpack_merge_(out, lse, o[sl], lo[sl], c, first)
    return out.to(q.dtype), lse


def packed_backward(dout, q, k, v, out, lse, pattern: DilationPattern, scale: float, kernel):
    """Gradients for :func:`packed_forward`; padding slots get ``dout = 0`` and ``lse = +inf``, so
    they receive and send exactly zero gradient. Accumulated in the inputs' dtype."""
    covered = 1 in pattern.dilation_rates
    alloc = torch.empty_like if covered else torch.zeros_like
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    for call in _packed_calls(pattern, q):
        (qp, kp, vp, op, dop), lp = _gather(call, (q, k, v, out, dout), lse)
        grads = kernel.backward(dop, qp, kp, vp, op, lp, True, scale)
        for first, c, sl in _slices(call):
            unpack_accumulate_((dq, dk, dv), [g[sl] for g in grads], c, first)
    return dq, dk, dv


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, causal, scale, kernel):
        packed = use_packed(q, causal)
        if packed:
            out, lse = packed_forward(q, k, v, pattern, scale, kernel)
        else:
            out, lse = dilated_forward(q, k, v, pattern, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (pattern, causal, scale, kernel, packed)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, causal, scale, kernel, packed = ctx.args
        dout = normalize_layout(dout)
        if packed:
            dq, dk, dv = packed_backward(dout, q, k, v, out, lse, pattern, scale, kernel)
        else:
            dq, dk, dv = dilated_backward(dout, q, k, v, out, lse, pattern, causal, scale, kernel)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable  # Python-level plan and custom kernels: a graph break, never traced
def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates=None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LongNet dilated attention of ``q, k, v`` ``[B, N, H, D]`` → ``[B, N, H, D]``.

    ``segment_lengths`` and ``dilation_rates`` give the branches ``(w_i, r_i)`` (or pass a
    :class:`DilationPattern` as ``segment_lengths``). Every head runs every branch with offset
    ``head mod r``; branches are mixed by their softmax denominators with exact gradients. Any
    ``N >= 1`` works, including ``N < w``, ``w % r != 0`` and ``H % r != 0``.

    ``backend``: ``auto`` (fastest that runs here), ``sdpa``, ``xformers``, ``torch`` (plain
    PyTorch, any device) or ``reference`` (dense ``N x N``, for tests and tiny inputs).
    """
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return dilated_attention_reference(q, k, v, pattern, causal=causal, scale=scale)
    kernel = select_kernel(backend, q)
    q, k, v = normalize_layout(q), normalize_layout(k), normalize_layout(v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _DilatedAttentionFn.apply(q, k, v, pattern, causal, scale, kernel)
    if use_packed(q, causal):
        return packed_forward(q, k, v, pattern, scale, kernel)[0]
    return dilated_forward(q, k, v, pattern, causal, scale, kernel)[0]


class DilatedAttention(nn.Module):
    """:func:`dilated_attention` as a module: ``forward(q, k, v)`` on ``[B, N, H, D]``."""

    def __init__(self, segment_lengths, dilation_rates, causal: bool = True, scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
        self.pattern = DilationPattern.of(segment_lengths, dilation_rates)
        self.causal, self.scale, self.backend = causal, scale, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(q, k, v, self.pattern, causal=self.causal, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.pattern}, causal={self.causal}, backend={self.backend!r}"
