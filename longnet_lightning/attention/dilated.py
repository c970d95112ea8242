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

import torch
from torch import nn

from .kernels import BACKENDS, select_kernel
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


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, causal, scale, kernel):
        out, lse = dilated_forward(q, k, v, pattern, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (pattern, causal, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = normalize_layout(dout)
        dq, dk, dv = dilated_backward(dout, q, k, v, out, lse, *ctx.args)
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
