"""The dense reference of docs/semantics.md: attention with the additive bias ``log M_h(p, k)``.

``M_h(p, k)`` counts the branches in which positions ``p`` and ``k`` are both selected for head
``h`` in the same segment (and ``k <= p`` when causal). ``O(N^2)`` memory: for tests and tiny
inputs only. Written from the definition, sharing no index logic with the fast path.
"""
from __future__ import annotations

import torch


def multiplicity(n: int, heads: int, pattern, causal: bool, device=None) -> torch.Tensor:
    """``M`` ``[H, N, N]`` (int64): in how many branches query ``p`` sees key ``k`` for head ``h``."""
    pos = torch.arange(n, device=device)
    head = torch.arange(heads, device=device)
    m = torch.zeros(heads, n, n, dtype=torch.int64, device=device)
    for w, r in pattern.branches:
        seg = pos // w
        selected = ((pos - seg * w)[None, :] % r) == (head[:, None] % r)  # [H, N]
        same_seg = seg[:, None] == seg[None, :]  # [N, N]
        m += (selected[:, :, None] & selected[:, None, :] & same_seg).long()
    if causal:
        m = m * (pos[None, :] <= pos[:, None]).long()
    return m


def dilated_attention_reference(q, k, v, pattern, causal: bool = True, scale: float | None = None):
    """Dense dilated attention ``[B, N, H, D]`` → ``[B, N, H, D]``; differentiable by autograd.

    Rows that no branch covers (no ``r = 1`` branch) return zeros.
    """
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    m = multiplicity(n, h, pattern, causal, device=q.device).to(q.dtype)  # [H, N, N]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + torch.log(m)  # log 0 = -inf
    covered = (m.sum(-1) > 0)[None, :, :, None]  # [1, H, N, 1]
    p = torch.softmax(s.masked_fill(~covered, 0.0), dim=-1) * covered
    return torch.einsum("bhqk,bkhd->bqhd", p, v)
