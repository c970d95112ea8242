"""Relative positions applied to ``q`` and ``k`` at their absolute positions: RoPE and XPOS.

XPOS (Sun et al., 2022) is RoPE times a per-dimension decay: ``q_n`` is scaled by
``zeta^(n/B)`` and ``k_m`` by ``zeta^(-m/B)``, so ``q_n . k_m`` carries ``zeta^((n-m)/B)``. Only
the difference matters, so exponents are taken relative to an anchor (the centre of the block
that holds the position) to keep the factors inside float32's range. Every segment of every
branch must lie inside one block (block = lcm of the segment lengths), which makes the result
exactly XPOS for every query-key pair dilated attention computes. Blocks therefore start where
the attention's segment grid starts (``origin``): at the first position of a call on one device,
at global position 0 for a chunk of a sequence split over ranks.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# Rotation/decay factors, shared by all Rotary modules: the few most recent (length, start,
# device, dtype, mode) keys, e.g. training and validation lengths, or one per device.
_FACTORS: OrderedDict = OrderedDict()
_FACTORS_KEPT = 4
# |exponent| * |log zeta_min| must stay well inside float32's range (about 87).
_XPOS_MAX_HALF_SPAN = 35_000


class Rotary(nn.Module):
    """RoPE (``xpos_scale_base=None``) or XPOS on ``q, k`` ``[B, N, H, D]``.

    ``anchor_block``: XPOS decay exponents are relative to the centre of the block of that many
    positions holding each position; ``None`` uses one block, the whole sequence.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, xpos_scale_base: float | None = None,
                 xpos_gamma: float = 0.4, anchor_block: int | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: rotary position encodings need an even head dim")
        self.head_dim, self.theta, self.scale_base = head_dim, theta, xpos_scale_base
        self.gamma, self.anchor_block = xpos_gamma, anchor_block

    def _tables(self, n: int, start: int, origin: int, device):
        """``cos, sin`` ``[N, D/2]`` and the XPOS decay ``[N, D/2]`` (``None`` for RoPE), float64,
        for positions ``start..start+N-1`` with anchor blocks starting at ``origin``."""
        pos = torch.arange(start, start + n, device=device, dtype=torch.float64)
        i = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
        ang = pos[:, None] * self.theta ** (-i / self.head_dim)[None, :]  # [N, D/2], float64: exact at 1M
        cos, sin = ang.cos(), ang.sin()
        if self.scale_base is None:
            return cos, sin, None
        if self.anchor_block is None:
            anchor = torch.full_like(pos, start + n // 2)
        else:
            b = self.anchor_block
            anchor = origin + torch.div(pos - origin, b, rounding_mode="floor") * b + b // 2
        span = self._max_offset(start - origin, n)
        if span > _XPOS_MAX_HALF_SPAN:
            raise ValueError(
                f"XPOS over {n} positions with anchor_block={self.anchor_block}: decay factors leave "
                f"float32's range beyond {2 * _XPOS_MAX_HALF_SPAN} positions in one block. Use "
                "position='rope', or dilated attention (whose segments bound the block)."
            )
        zeta = (i / self.head_dim + self.gamma) / (1 + self.gamma)  # [D/2]
        decay = zeta[None, :] ** ((pos - anchor)[:, None] / self.scale_base)  # [N, D/2]
        return cos, sin, decay

    def _max_offset(self, start: int, n: int) -> int:
        """Largest ``|position - anchor|`` over ``start..start+n-1``, in plain Python (no sync)."""
        if n < 1:
            return 0
        if self.anchor_block is None:
            return max(n // 2, n - 1 - n // 2)
        b = self.anchor_block
        if -(-start // b) * b <= start + n - 1 and start % b:  # the range crosses a block start
            return b // 2
        dev = lambda p: abs(p - (p // b * b + b // 2))  # noqa: E731
        return max(dev(start), dev(start + n - 1))

    def factors(self, n: int, start: int, device, dtype, origin: int | None = None) -> tuple[torch.Tensor, ...]:
        """``(cq, sq, ck, sk)``, each ``[N, D]`` in ``dtype``: ``rotate(x) = x * c + rotate_half(x) * s``.

        Shared by every layer with the same settings (one copy, not one per layer); the last few
        (length, start, device, dtype, inference mode) combinations are kept (tables made under
        ``inference_mode`` cannot be saved for backward, so that mode has its own).
        """
        origin = start if origin is None else origin
        if torch.compiler.is_compiling():  # an opaque call: inlined, the float64 tables would be recomputed per element
            return _factors_op(n, start, origin, self.head_dim, self.theta, self.scale_base, self.gamma,
                               self.anchor_block, torch.device(device), dtype)
        key = (self.head_dim, self.theta, self.scale_base, self.gamma, self.anchor_block, n, start, origin,
               torch.device(device), dtype, torch.is_inference_mode_enabled())
        hit = _FACTORS.get(key)
        if hit is not None:
            _FACTORS.move_to_end(key)
        else:
            hit = _FACTORS[key] = self._combined(n, start, origin, device, dtype)
            while len(_FACTORS) > _FACTORS_KEPT:
                _FACTORS.popitem(last=False)
        return hit

    def _combined(self, n: int, start: int, origin: int, device, dtype) -> tuple[torch.Tensor, ...]:
        """``(cq, sq, ck, sk)`` of :meth:`factors`, computed now (four distinct tensors)."""
        cos, sin, decay = self._tables(n, start, origin, device)
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        if decay is None:
            return tuple(t.to(dtype) for t in (c, s, c.clone(), s.clone()))
        d = torch.cat((decay, decay), -1)
        return tuple(t.to(dtype) for t in (c * d, s * d, c / d, s / d))

    @staticmethod
    def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)  # halves, [B, N, H, D/2]
        return torch.addcmul(x * c[:, None], torch.cat((-x2, x1), dim=-1), s[:, None]).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int = 0, origin: int | None = None):
        """``q, k`` ``[B, N, H, D]`` at positions ``start..start+N-1`` → rotated (and scaled).

        ``origin``: where the attention's segment grid starts (default ``start``: the call's own
        first position; 0 for a chunk of a sequence split over ranks). Computed in float32
        (float64 for float64 inputs) from float64 tables: exact at 1M positions.
        """
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        cq, sq, ck, sk = self.factors(q.shape[1], start, q.device, dt, origin)
        return self._rotate(q, cq, sq), self._rotate(k, ck, sk)

    def extra_repr(self) -> str:
        kind = "rope" if self.scale_base is None else f"xpos(scale_base={self.scale_base}, anchor_block={self.anchor_block})"
        return f"{kind}, head_dim={self.head_dim}"


@torch.library.custom_op("longnet::rotary_factors", mutates_args=())
def _factors_op(n: int, start: int, origin: int, head_dim: int, theta: float, scale_base: float | None,
                gamma: float, anchor_block: int | None, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Rotary.factors` inside a compiled graph: computed once per call, ``[N, D]`` each."""
    rot = Rotary(head_dim, theta, scale_base, gamma, anchor_block)
    return rot._combined(n, start, origin, device, dtype)


@_factors_op.register_fake
def _(n, start, origin, head_dim, theta, scale_base, gamma, anchor_block, device, dtype):
    return tuple(torch.empty(n, head_dim, device=device, dtype=dtype) for _ in range(4))
