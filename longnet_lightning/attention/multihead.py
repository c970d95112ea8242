"""Multi-head dilated self-attention, batch first: ``[B, N, E] -> [B, N, E]``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dilated import dilated_attention
from .kernels import BACKENDS
from .pattern import DilationPattern
from .position import Rotary
from .settings import AttentionSettings


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that keeps a bf16/fp16 input's dtype under autocast.

    Autocast runs LayerNorm in float32 and returns float32, which costs a cast on the way in and
    another before the next matmul. The fused kernel already accumulates its statistics in
    float32, so normalising in the input dtype gives the same result the next (autocast) matmul
    sees, at a fraction of the memory traffic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            cast = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, cast(self.weight), cast(self.bias), self.eps)
        return super().forward(x)


def dense_attention(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Ordinary softmax attention (torch SDPA) on ``[B, N, H, D]`` → ``[B, N, H, D]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


class MultiheadDilatedAttention(nn.Module):
    """Self-attention with LongNet's dilated attention, usable in any model.

    Args:
        embed_dim: model width E (a multiple of ``num_heads``).
        num_heads: heads H; head dim is ``E / H``.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``. ``segment_lengths=None``
            gives dense attention (the Transformer baseline) through the same module.
        causal: mask future positions (decoder language models).
        dropout: dropout on the output projection (attention probabilities are not dropped:
            the branches are merged from kernel outputs).
        bias: biases in the projections.
        sub_layernorm: MAGNETO's LayerNorm before the output projection.
        position: ``"xpos"``, ``"rope"`` or ``None``, applied to q and k at absolute positions.
        backend: dilated attention backend (see :func:`dilated_attention`).
        settings: :class:`AttentionSettings`, how the attention runs.
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths=None, dilation_rates=None,
                 causal: bool = True, dropout: float = 0.0, bias: bool = True, sub_layernorm: bool = True,
                 layer_norm_eps: float = 1e-5, position: str | None = None, rope_theta: float = 10000.0,
                 xpos_scale_base: float = 512.0, backend: str = "auto",
                 settings: AttentionSettings | dict | None = None, device=None, dtype=None):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if position not in (None, "xpos", "rope"):
            raise ValueError(f"position={position!r} must be 'xpos', 'rope' or None")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
        self.pattern = None if segment_lengths is None else DilationPattern.of(segment_lengths, dilation_rates)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.backend, self.settings = causal, backend, AttentionSettings.of(settings)
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.inner_norm = LayerNorm(embed_dim, eps=layer_norm_eps, **kw) if sub_layernorm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)
        anchor = self.pattern.anchor_block if self.pattern is not None else None
        self.rotary = None if position is None else Rotary(
            self.head_dim, theta=rope_theta, xpos_scale_base=xpos_scale_base if position == "xpos" else None,
            anchor_block=anchor,
        )
        self.reset_parameters()

    def reset_parameters(self, gain: float = 1.0) -> None:
        """Xavier init (q, k, v with gain 1/sqrt(2)); ``gain`` scales v and out (MAGNETO)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        with torch.no_grad():
            self.v_proj.weight.mul_(gain)
            self.out_proj.weight.mul_(gain)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, start_pos: int = 0, group=None, lengths=None) -> torch.Tensor:
        """``x`` ``[B, N, E]`` (positions ``start_pos..``) → ``[B, N, E]``.

        ``group``: a process group over which one sequence is split; ``x`` is this rank's
        contiguous chunk (its positions follow from every rank's chunk length, ``lengths``,
        gathered here when not given) and the result is this rank's chunk of the output.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, N, {self.embed_dim}], got {tuple(x.shape)}")
        b, n, _ = x.shape
        origin = start_pos
        if group is not None:
            if self.pattern is None:
                raise ValueError("sequence parallelism (group=) needs dilated attention: dense attention would need "
                                 "every key on every rank; set segment_lengths and dilation_rates")
            if start_pos:
                raise ValueError(f"start_pos={start_pos} with group=: a chunk's position comes from the group's "
                                 "chunk lengths; leave start_pos at 0")
            if lengths is None:
                from ..distributed.sequence import gather_lengths

                lengths = gather_lengths(group, n, x.device, batch=b)
            from torch.distributed import get_rank

            start_pos, origin = sum(lengths[:get_rank(group)]), 0  # segments lie on the global grid
        q, k, v = self._qkv(x)
        if self.rotary is not None:
            q, k = self.rotary(q, k, start=start_pos, origin=origin)
        if self.pattern is None:
            y = dense_attention(q, k, v, causal=self.causal)
        else:
            y = dilated_attention(q, k, v, self.pattern, causal=self.causal, backend=self.backend,
                                  settings=self.settings, group=group, lengths=lengths)
        y = y.reshape(b, n, self.embed_dim)  # [B, N, E]
        if self.inner_norm is not None:
            y = self.inner_norm(y)
        return self.dropout(self.out_proj(y))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` ``[B, N, H, D]`` from one matmul over the three projections' weights
        (one larger GEMM runs faster than three); views of its ``[B, N, 3, H, D]`` output."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projs])
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
        qkv = F.linear(x, weight, bias).view(*x.shape[:2], 3, self.num_heads, self.head_dim)
        return qkv.unbind(2)

    def extra_repr(self) -> str:
        kind = "dense" if self.pattern is None else str(self.pattern)
        return f"heads={self.num_heads}, {kind}, causal={self.causal}"
