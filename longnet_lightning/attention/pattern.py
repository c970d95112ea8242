"""The dilation pattern and where each (branch, head offset) reads its rows.

A branch ``(w, r)`` splits the sequence into segments of ``w`` positions and, in segment ``s``,
head ``h`` keeps the positions ``s*w + o + j*r`` with ``o = h mod r`` (SPEC.md). Heads that share
an offset share the selected positions, so one kernel call covers all of them: the rows of
head-offset ``o`` are a *strided view* of ``[B, N, H, D]`` (row stride ``r`` positions, head stride
``r`` heads), never a gathered copy. :func:`plan_branch` lists those views as :class:`Block`\\ s.
"""
from __future__ import annotations

import functools
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
        """Forward FLOPs as SPEC.md counts them: ``2*N*H*D*sum(w/r^2)`` causal, doubled otherwise."""
        f = 2.0 * n * heads * head_dim * sum(w / r**2 for w, r in self.branches)
        return f if causal else 2 * f

    def __str__(self) -> str:
        return f"w={list(self.segment_lengths)} r={list(self.dilation_rates)}"


@dataclass(frozen=True)
class Block:
    """One kernel call: ``[Bt, L, G, D]`` rows of one branch and one head offset.

    The view starts at position ``start + offset`` of batch row ``batch`` (all rows when
    ``batch`` is None and ``Bt`` folds batch and segments), head ``offset``; consecutive kernel
    batch entries are ``batch_stride`` positions apart (a segment), rows ``r`` positions apart,
    heads ``r`` heads apart.
    """

    batch: int | None  # None: every batch row, folded into Bt
    start: int  # first position of the first segment
    offset: int  # head offset o = h mod r, also the first selected position in each segment
    r: int
    bt: int  # kernel batch: number of segments (times B when batch is None)
    batch_stride: int  # positions between consecutive kernel batch entries
    length: int  # rows per segment, L
    heads: int  # heads with this offset, G


def _segments_view_ok(n: int, w: int, bsz: int) -> bool:
    return bsz == 1 or n % w == 0


def plan_branch(n: int, heads: int, w: int, r: int, bsz: int) -> list[Block]:
    """Kernel calls that cover branch ``(w, r)`` for a ``[bsz, n, heads, D]`` input.

    Every row of a block is a selected position (no padding): full segments have
    ``ceil((w - o) / r)`` rows for offset ``o``, the last partial segment its own count.
    """
    blocks: list[Block] = []
    full = n // w
    rest = n - full * w
    for o in range(min(r, heads)):
        g = len(range(o, heads, r))
        length = -(-(w - o) // r) if o < w else 0
        if full and length:
            if _segments_view_ok(n, w, bsz):
                blocks.append(Block(None, 0, o, r, bsz * full, w, length, g))
            else:  # batch rows are not a whole number of segments apart: one call per row
                blocks += [Block(b, 0, o, r, full, w, length, g) for b in range(bsz)]
        tail = -(-(rest - o) // r) if rest > o else 0
        if tail:
            blocks.append(Block(None, full * w, o, r, bsz, n, tail, g))
    return blocks


def split_block(blk: Block, max_rows: int) -> list[Block]:
    """``blk`` cut along its kernel batch so each call holds at most ``max_rows`` rows x heads."""
    per = max(1, max_rows // max(1, blk.length * blk.heads))
    if blk.bt <= per:
        return [blk]
    return [
        Block(blk.batch, blk.start + i * blk.batch_stride, blk.offset, blk.r, min(per, blk.bt - i),
              blk.batch_stride, blk.length, blk.heads)
        for i in range(0, blk.bt, per)
    ]


def block_view(x: torch.Tensor, blk: Block) -> torch.Tensor:
    """The rows of ``blk`` in ``x`` ``[B, N, H, *rest]`` as a strided view ``[Bt, L, G, *rest]``.

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


@functools.lru_cache(maxsize=64)
def packed_index(bsz: int, n: int, heads: int, w: int, r: int, device: torch.device):
    """Where each slot of branch ``(w, r)``'s *packed* layout ``[S, L, H]`` reads its row.

    Packed layout: every segment of every batch row (``S = bsz * ceil(N / w)``), ``L =
    ceil(min(w, N) / r)`` rows, all ``H`` heads; slot ``(s, j, h)`` holds position
    ``s*w + (h mod r) + j*r`` of head ``h``. Returns flat indices into ``[B*N*H]`` (``-1`` for a
    slot past its segment or the sequence: always the last rows of a segment, so a causal kernel
    never lets a real query see them) and ``(S, L)``.
    """
    nseg, length = -(-n // w), -(-min(w, n) // r)
    s = torch.arange(nseg, device=device)[:, None, None]
    j = torch.arange(length, device=device)[None, :, None]
    h = torch.arange(heads, device=device)[None, None, :]
    in_seg = h % r + j * r  # [1, L, H]
    pos = s * w + in_seg  # [nseg, L, H]
    flat = torch.where((in_seg < w) & (pos < n), pos * heads + h, -1)
    b = torch.arange(bsz, device=device)[:, None, None, None] * (n * heads)
    flat = torch.where(flat >= 0, flat[None] + b, -1)  # [B, nseg, L, H]
    return flat.reshape(-1), (bsz * nseg, length)
