"""Dilated attention (LongNet, Ding et al. 2023), exactly as SPEC.md defines it.

For every branch ``(w, r)`` and every head offset ``o``, one kernel call attends inside the
selected rows (strided views, see :mod:`.pattern`). Branch results are merged by their softmax
denominators (paper Eq. 10), online, into a float32 accumulator:
``lse = logaddexp(lse, lse_i)``, ``out = out * exp(lse_old - lse) + out_i * exp(lse_i - lse)``.

The backward does not differentiate through the merge weights: the merged attention is one
softmax over the multiset union of the branches' keys, so each branch's kernel backward, fed the
*merged* output and log-sum-exp, returns that branch's exact share of the gradient (as ring
attention does). Gradients are accumulated into float32 buffers through the same views.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import BACKENDS, select_kernel
from .pattern import DilationPattern, block_view, normalize_layout, plan_branch
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


def _blocks(pattern: DilationPattern, q: torch.Tensor):
    bsz, n, h, _ = q.shape
    for w, r in pattern.branches:
        yield from plan_branch(n, h, w, r, bsz)


def dilated_forward(q, k, v, pattern: DilationPattern, causal: bool, scale: float, kernel):
    """Merged output ``[B, N, H, Dv]`` (q's dtype) and log-sum-exp ``[B, N, H]`` (float32/64).

    Rows that no branch selects keep output 0 and ``lse = -inf``.
    """
    acc = _accum_dtype(q.dtype)
    bsz, n, h, _ = q.shape
    out = torch.zeros(bsz, n, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((bsz, n, h), float("-inf"), dtype=acc, device=q.device)
    for blk in _blocks(pattern, q):
        o_i, lse_i = kernel.forward(block_view(q, blk), block_view(k, blk), block_view(v, blk), causal, scale)
        lse_i = lse_i.transpose(1, 2).to(acc)  # [Bt, L, G]
        o_v, lse_v = block_view(out, blk), block_view(lse, blk)
        new = torch.logaddexp(lse_v, lse_i)
        o_v.mul_(torch.exp(lse_v - new)[..., None]).add_(o_i.to(acc) * torch.exp(lse_i - new)[..., None])
        lse_v.copy_(new)
    return out.to(q.dtype), lse


def dilated_backward(dout, q, k, v, out, lse, pattern: DilationPattern, causal, scale, kernel):
    """Gradients of the merged attention w.r.t. ``q, k, v`` (each ``[B, N, H, D]``)."""
    acc = _accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for blk in _blocks(pattern, q):
        lse_b = block_view(lse, blk).transpose(1, 2).to(torch.float32 if acc == torch.float32 else acc)
        grads = kernel.backward(
            block_view(dout, blk), block_view(q, blk), block_view(k, blk), block_view(v, blk),
            block_view(out, blk), lse_b, causal, scale,
        )
        for buf, g in zip((dq, dk, dv), grads):
            block_view(buf, blk).add_(g)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
