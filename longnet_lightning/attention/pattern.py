"""The dilation pattern, and the strided views through which a kernel call reads its rows.

A branch ``(w, r)`` splits the sequence into segments of ``w`` positions and, in segment ``s``,
head ``h`` keeps the positions ``s*w + o + j*r`` with ``o = h mod r`` (docs/semantics.md). Heads
that share an offset share the selected positions, so one kernel call covers all of them: the rows
of head-offset ``o`` are a *strided view* of ``[B, N, H, D]`` (row stride ``r`` positions, head
stride ``r`` heads), never a gathered copy (:func:`block_view` of a :class:`.plan.Block`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch


def _as_int_list(name: str, values: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}") from None
    if not out:
        raise ValueError(f"{name} is empty: give at least one value, e.g. {name}=[2048]")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must hold positive integers, got {v!r} in {list(out)}")
    return out


@dataclass(frozen=True)
class DilationPattern:
    """Validated ``(segment_lengths, dilation_rates)``: branch ``i`` is ``(w_i, r_i)``.

    ``w % r != 0`` and ``H % r != 0`` are allowed. A pattern with no ``r = 1`` branch leaves some
    rows uncovered (zero output); that is allowed but warned about once.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]

    def __post_init__(self):
        w = _as_int_list("segment_lengths", self.segment_lengths)
        r = _as_int_list("dilation_rates", self.dilation_rates)
        if len(w) != len(r):
            raise ValueError(
                f"segment_lengths ({len(w)} values: {list(w)}) and dilation_rates ({len(r)} values: "
                f"{list(r)}) must have the same length: one dilation rate per segment length"
            )
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)
        if 1 not in r:
            warnings.warn(
                f"dilation pattern {self} has no branch with dilation rate 1: a query that no branch "
                "selects gets a zero output. Add a (w, 1) branch unless this is intended.",
                stacklevel=3,
            )

    @classmethod
    def of(cls, segment_lengths, dilation_rates) -> "DilationPattern":
        if isinstance(segment_lengths, DilationPattern):
            return segment_lengths
        return cls(segment_lengths, dilation_rates)

    @property
    def branches(self) -> list[tuple[int, int]]:
        return list(zip(self.segment_lengths, self.dilation_rates))

    @property
    def anchor_block(self) -> int:
        """Smallest length that every segment of every branch tiles: ``lcm(w_1..w_m)``."""
        return math.lcm(*self.segment_lengths)

    def flops(self, n: int, heads: int, head_dim: int, causal: bool = True) -> float:
        """Forward FLOPs as docs/semantics.md counts them: ``2*N*H*D*sum(w/r^2)`` causal, doubled otherwise."""
        f = 2.0 * n * heads * head_dim * sum(w / r**2 for w, r in self.branches)
        return f if causal else 2 * f

    def __str__(self) -> str:
        return f"w={list(self.segment_lengths)} r={list(self.dilation_rates)}"


def block_view(x: torch.Tensor, blk) -> torch.Tensor:
    """The rows of ``blk`` (a :class:`.plan.Block`) in ``x`` ``[B, N, H, *rest]`` as a strided view ``[Bt, L, G, *rest]``.

    Requires ``x.stride(0) == N * x.stride(1)`` whenever the block folds batch and segments
    (true for any ``[B, N, ...]`` tensor whose batch rows are contiguous, see
    :func:`normalize_layout`).
    """
    sb, sn, sh = x.stride()[:3]
    rest_shape, rest_stride = list(x.shape[3:]), list(x.stride()[3:])
    base = x.storage_offset() + (blk.start + blk.offset) * sn + blk.offset * sh
    if blk.batch is not None:
        base += blk.batch * sb
    return x.as_strided(
        [blk.bt, blk.length, blk.heads, *rest_shape],
        [blk.batch_stride * sn, blk.r * sn, blk.r * sh, *rest_stride],
        base,
    )


def normalize_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, N, H, D]`` with unit stride on D and batch rows ``N`` positions apart.

    Views such as ``qkv.unbind(2)`` of a fused ``[B, N, 3, H, D]`` projection pass unchanged;
    anything else is made contiguous once.
    """
    b, n = x.shape[:2]
    if x.stride(-1) == 1 and (b == 1 or x.stride(0) == n * x.stride(1)):
        return x
    return x.contiguous()
