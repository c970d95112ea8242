"""Dilated attention (LongNet, Ding et al. 2023), exactly as SPEC.md defines it.

For every branch ``(w, r)`` and every head offset ``o``, one kernel call attends inside the
selected rows (strided views, see :mod:`.pattern`). Branch results are merged by their softmax
denominators (paper Eq. 10), online, into a float32 accumulator:
``out += (out_i - out) * sigmoid(lse_i - lse)``, ``lse = logaddexp(lse, lse_i)``.

The backward does not differentiate through the merge weights: the merged attention is one
softmax over the multiset union of the branches' keys, so each branch's kernel backward, fed the
*merged* output and log-sum-exp, returns that branch's exact share of the gradient (as ring
attention does). Gradients are accumulated through the same views into dq, dk, dv.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from .kernels import BACKENDS, select_kernel
from .pattern import DilationPattern, block_view, normalize_layout, packed_index, plan_branch, split_block
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


# Rows x heads per kernel call: bounds the transient per-call outputs (64 MiB per bf16 tensor
# at head dim 64) whatever N is, so the gradients cost almost nothing beyond dq, dk, dv.
MAX_ROWS_PER_CALL = 2**19


def _plan(pattern: DilationPattern, q: torch.Tensor):
    """Kernel calls in merge order, and whether the first branch covers every row (``r = 1``).

    An ``r = 1`` branch goes first: it selects every (position, head) exactly once, so its
    results are written, not merged, and the accumulators need no initialisation.
    """
    bsz, n, h, _ = q.shape
    branches = sorted(pattern.branches, key=lambda b: b[1] != 1)  # stable: r = 1 first
    plan = []
    for i, (w, r) in enumerate(branches):
        for blk in plan_branch(n, h, w, r, bsz):
            plan += [(i, sub) for sub in split_block(blk, MAX_ROWS_PER_CALL)]
    return plan, branches[0][1] == 1


def dilated_forward(q, k, v, pattern: DilationPattern, causal: bool, scale: float, kernel):
    """Merged output ``[B, N, H, Dv]`` (q's dtype) and log-sum-exp ``[B, N, H]`` (float32/64).

    Rows that no branch selects keep output 0 and ``lse = -inf``.
    """
    acc = _accum_dtype(q.dtype)
    bsz, n, h, _ = q.shape
    plan, first_covers = _plan(pattern, q)
    alloc = torch.empty if first_covers else torch.zeros
    out = alloc(bsz, n, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty((bsz, n, h), dtype=acc, device=q.device)
    if not first_covers:
        lse.fill_(float("-inf"))
    for branch, blk in plan:
        o_i, lse_i = kernel.forward(block_view(q, blk), block_view(k, blk), block_view(v, blk), causal, scale)
        lse_i = lse_i.transpose(1, 2)  # [Bt, L, G]
        o_v, lse_v = block_view(out, blk), block_view(lse, blk)
        if branch == 0 and first_covers:
            o_v.copy_(o_i)
            lse_v.copy_(lse_i)
            continue
        # out += (o_i - out) * w_i with w_i = Z_i / (Z + Z_i): one softmax over the union.
        w_i = torch.sigmoid(lse_i - lse_v)[..., None]
        o_v.mul_(1 - w_i).addcmul_(o_i, w_i)
        lse_v.copy_(torch.logaddexp(lse_v, lse_i))
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
        for buf, g in zip((dq, dk, dv), grads):
            view = block_view(buf, blk)
            view.copy_(g) if branch == 0 and first_covers else view.add_(g)
    return dq, dk, dv


# Packed plan: each branch gathered into [S, L, H, D] and run as ONE kernel call (all segments,
# all heads), merged through index maps. Few large launches: fastest for short and medium N;
# costs gathered copies, so long sequences use the copy-free strided plan.
PACKED_MAX_TOKENS = int(os.environ.get("LONGNET_PACKED_MAX_TOKENS", 2**15))  # crossover measured on an H200


def use_packed(q: torch.Tensor, causal: bool) -> bool:
    """Packed plan for causal attention on up to ``PACKED_MAX_TOKENS`` tokens (B x N).

    Its padded rows are harmless only under a causal mask, and its merges use ``index_add_``,
    which is not deterministic on CUDA (so deterministic mode keeps the strided plan).
    """
    if not causal or (q.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return False
    return q.shape[0] * q.shape[1] <= PACKED_MAX_TOKENS


def _packed_maps(pattern, q):
    """Per branch, r = 1 first: gather indices (pad slots read row 0), scatter indices (pad slots
    go to the spare row ``M``), the pad mask, and the packed shape ``(S, L)``."""
    bsz, n, h, _ = q.shape
    m = bsz * n * h
    for i, (w, r) in enumerate(sorted(pattern.branches, key=lambda b: b[1] != 1)):
        flat, shape = packed_index(bsz, n, h, w, r, q.device)
        pad = flat < 0
        yield i, r, flat.clamp(min=0), torch.where(pad, m, flat), pad, shape


def packed_forward(q, k, v, pattern: DilationPattern, scale: float, kernel):
    """Causal dilated attention, packed plan: same results as :func:`dilated_forward`."""
    acc = _accum_dtype(q.dtype)
    bsz, n, h, d = q.shape
    m, dv = bsz * n * h, v.shape[-1]
    first_covers = 1 in pattern.dilation_rates
    out = (torch.empty if first_covers else torch.zeros)(m + 1, dv, dtype=acc, device=q.device)
    lse = torch.full((m + 1,), float("-inf"), dtype=acc, device=q.device)
    qf, kf, vf = q.reshape(m, d), k.reshape(m, d), v.reshape(m, dv)
    for i, r, gather, scatter, _, (segs, length) in _packed_maps(pattern, q):
        take = lambda x, width: x.index_select(0, gather).view(segs, length, h, width)  # noqa: E731
        o_i, lse_i = kernel.forward(take(qf, d), take(kf, d), take(vf, dv), True, scale)
        o_i, lse_i = o_i.reshape(-1, dv).to(acc), lse_i.transpose(1, 2).reshape(-1).to(acc)
        if i == 0 and r == 1:
            out.index_copy_(0, scatter, o_i)
            lse.index_copy_(0, scatter, lse_i)
            continue
        old = lse.index_select(0, scatter)
        merged = out.index_select(0, scatter).lerp_(o_i, torch.sigmoid(lse_i - old)[:, None])
        out.index_copy_(0, scatter, merged)
        lse.index_copy_(0, scatter, torch.logaddexp(old, lse_i))
    return out[:m].view(bsz, n, h, dv).to(q.dtype), lse[:m].view(bsz, n, h)


def packed_backward(dout, q, k, v, out, lse, pattern: DilationPattern, scale: float, kernel):
    """Gradients for :func:`packed_forward`; pad slots get ``dout = 0`` and ``lse = +inf``, so
    they receive and send exactly zero gradient."""
    acc = _accum_dtype(q.dtype)
    bsz, n, h, d = q.shape
    m, dv = bsz * n * h, v.shape[-1]
    grads = [torch.zeros(m + 1, x.shape[-1], dtype=acc, device=q.device) for x in (q, k, v)]
    flat = [x.reshape(m, x.shape[-1]) for x in (q, k, v, out, dout)]
    lsef = lse.reshape(m)
    for _, _, gather, scatter, pad, (segs, length) in _packed_maps(pattern, q):
        qp, kp, vp, op, dop = (x.index_select(0, gather).view(segs, length, h, x.shape[-1]) for x in flat)
        dop.masked_fill_(pad.view(segs, length, h, 1), 0)
        lsep = lsef.index_select(0, gather).masked_fill_(pad, float("inf")).view(segs, length, h).transpose(1, 2)
        for buf, g in zip(grads, kernel.backward(dop, qp, kp, vp, op, lsep, True, scale)):
            buf.index_add_(0, scatter, g.reshape(-1, buf.shape[-1]).to(acc))
    return tuple(g[:m].view(x.shape).to(x.dtype) for g, x in zip(grads, (q, k, v)))


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
