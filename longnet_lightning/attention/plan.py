"""Plans: which kernel calls compute dilated attention, on which rows, in which order.

A plan is built from the pattern, the shapes and the settings alone (never from the data, never
from a process's fallbacks) and cached, so every call with the same key, on every rank of a
group, runs the same kernel calls and the same collectives.

* **strided** (:func:`strided_plan`): for each branch and head offset, the selected rows are a
  strided view of ``[B, N, H, D]`` (a :class:`Block`); no copies, any length.
* **packed** (:func:`packed_plan`): each branch's segments gathered into dense ``[S, L, H, D]``
  blocks (a :class:`Chunk`; padding slots are the last rows of a segment), whole branches of
  equal ``L`` folded into one call. Few large launches: fastest for short causal inputs.
  :func:`use_packed` chooses between the two.
* **sharded** (:func:`shard_plan`): one rank's contiguous chunk of a sequence split over a group
  (:class:`SequenceLayout`). Segments inside the chunk take the strided plan over that range;
  a segment that spans ranks becomes :class:`SpanCall` s, this rank's queries against keys made
  of :class:`Piece` s: the selected rows of each rank that holds part of the segment, sent by
  that rank already sparsified (only earlier ranks' and its own when causal).

Segments always lie on the *global* grid ``[s*w, (s+1)*w)`` of the whole sequence.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .pattern import DilationPattern
from .settings import AttentionSettings

# Rows x heads per kernel call: bounds the transient per-call outputs (64 MiB per bf16 tensor
# at head dim 64) whatever N is, so the gradients cost almost nothing beyond dq, dk, dv.
MAX_ROWS_PER_CALL = 2**19


def branch_order(pattern: DilationPattern) -> list[tuple[int, int]]:
    """Branches in merge order: an ``r = 1`` branch first (it selects every row exactly once, so
    its results are written, not merged, and the accumulators need no initialisation)."""
    return sorted(pattern.branches, key=lambda b: b[1] != 1)  # stable


# ---------------------------------------------------------------------------------- strided plan

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


def plan_branch(n: int, heads: int, w: int, r: int, bsz: int, lo: int = 0, hi: int | None = None) -> list[Block]:
    """Kernel calls that cover branch ``(w, r)`` on positions ``[lo, hi)`` of a ``[bsz, n, heads, D]``
    input whose segments start at ``lo`` (all of them ``w`` long but the last, which ends at ``hi``).

    Every row of a block is a selected position (no padding): full segments have
    ``ceil((w - o) / r)`` rows for offset ``o``, the last partial segment its own count.
    """
    hi = n if hi is None else hi
    blocks: list[Block] = []
    full = (hi - lo) // w
    rest = (hi - lo) - full * w
    fold = bsz == 1 or (lo == 0 and hi == n and n % w == 0)  # batch rows a whole number of segments apart
    for o in range(min(r, heads)):
        g = len(range(o, heads, r))
        length = -(-(w - o) // r) if o < w else 0
        if full and length:
            if fold:
                blocks.append(Block(None, lo, o, r, bsz * full, w, length, g))
            else:  # one call per batch row
                blocks += [Block(b, lo, o, r, full, w, length, g) for b in range(bsz)]
        tail = -(-(rest - o) // r) if rest > o else 0
        if tail:
            blocks.append(Block(None, lo + full * w, o, r, bsz, n, tail, g))
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


@functools.lru_cache(maxsize=64)
def lead_block(pattern: DilationPattern, bsz: int, n: int, h: int) -> Block | None:
    """The first branch as one unsplit call, when it covers every row in a single plain view
    (``r = 1`` and ``N`` a multiple of ``w``, or ``N <= w``): its kernel output, laid out like
    ``[B, N, H, D]``, can then *be* the accumulator, with nothing copied."""
    w, r = branch_order(pattern)[0]
    if r != 1:
        return None
    blocks = plan_branch(n, h, w, r, bsz)
    if len(blocks) != 1 or blocks[0].batch is not None or blocks[0].bt * blocks[0].length != bsz * n:
        return None
    return blocks[0]


@functools.lru_cache(maxsize=64)
def strided_plan(pattern: DilationPattern, bsz: int, n: int, h: int, max_rows: int = MAX_ROWS_PER_CALL):
    """``((branch index, Block), ...)`` in merge order, and whether the first branch covers every
    row (``r = 1``: its blocks are written, not merged)."""
    branches = branch_order(pattern)
    plan = []
    for i, (w, r) in enumerate(branches):
        for blk in plan_branch(n, h, w, r, bsz):
            plan += [(i, sub) for sub in split_block(blk, max_rows)]
    return tuple(plan), branches[0][1] == 1


# ----------------------------------------------------------------------------------- packed plan

@dataclass(frozen=True)
class Chunk:
    """Segments ``s0 <= s < s1`` (over all batch rows, ``nseg`` per row) of branch ``(w, r)`` of
    a ``[bsz, n, heads, D]`` input, packed as ``[s1 - s0, length, heads, D]``."""

    bsz: int
    n: int
    heads: int
    w: int
    r: int
    s0: int
    s1: int

    @property
    def nseg(self) -> int:
        return -(-self.n // self.w)

    @property
    def length(self) -> int:
        return -(-min(self.w, self.n) // self.r)

    @property
    def segments(self) -> int:
        return self.s1 - self.s0

    @property
    def rows(self) -> int:
        return self.segments * self.length * self.heads

    @property
    def is_view(self) -> bool:
        """``r = 1`` and whole segments: the packed block is a plain view, nothing to gather."""
        return self.r == 1 and self.n % min(self.w, self.n) == 0


def chunks(bsz: int, n: int, heads: int, w: int, r: int, max_rows: int) -> list[Chunk]:
    """Branch ``(w, r)`` cut into chunks of whole segments, each at most ``max_rows`` slots
    (rows x heads) unless one segment alone is larger."""
    whole = Chunk(bsz, n, heads, w, r, 0, bsz * -(-n // w))
    per = max(1, max_rows // (whole.length * heads))
    return [Chunk(bsz, n, heads, w, r, s, min(s + per, whole.s1)) for s in range(0, whole.s1, per)]


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


def use_packed(q: torch.Tensor, causal: bool, settings: AttentionSettings, triton: bool) -> bool:
    """Packed plan for causal attention on up to ``settings.packed_max_tokens`` tokens (B x N).

    Its padded rows are harmless only under a causal mask (they are the last rows of their
    segment). Without Triton its CUDA merges use index ops, so deterministic mode then keeps the
    strided plan.
    """
    if not causal or (q.is_cuda and torch.are_deterministic_algorithms_enabled() and not triton):
        return False
    return q.shape[0] * q.shape[1] <= settings.packed_max_tokens


@functools.lru_cache(maxsize=64)
def packed_plan(pattern: DilationPattern, bsz: int, n: int, h: int, fold: bool = True,
                max_rows: int = MAX_ROWS_PER_CALL,
                split_first: bool = True) -> tuple[tuple[tuple[bool, Chunk], ...], ...]:
    """Kernel calls of the packed plan, in merge order: each a tuple of ``(first, chunk)``.

    ``first`` marks chunks of the first branch when it covers every row (``r = 1``): they are
    written, not merged, so they come first. A chunk that is a plain view (``r = 1``, whole
    segments) is a call of its own, read in place; unless ``split_first``, such a first branch
    is one chunk whatever ``max_rows``. With ``fold``, other chunks that are whole branches join
    an earlier call of the same packed length (their segments stacked along the batch: the paper
    pattern at 32K takes 3 calls instead of 5).
    """
    covered = 1 in pattern.dilation_rates
    calls, by_length = [], {}
    for i, (w, r) in enumerate(branch_order(pattern)):
        one_call = i == 0 and covered and not split_first and Chunk(bsz, n, h, w, r, 0, 1).is_view
        for c in chunks(bsz, n, h, w, r, 2**62 if one_call else max_rows):
            item = (i == 0 and covered, c)
            whole = c.s0 == 0 and c.s1 == bsz * c.nseg
            if c.is_view:  # its own call: nothing to gather (a folded call would copy it)
                calls.append([item])
                continue
            if fold and whole and c.length in by_length:
                by_length[c.length].append(item)
                continue
            calls.append([item])
            if whole:
                by_length.setdefault(c.length, calls[-1])
    return tuple(tuple(call) for call in calls)


# ---------------------------------------------------------------------------------- sharded plan


@dataclass(frozen=True)
class SequenceLayout:
    """How one sequence is split over the ranks of a group: every rank's chunk length, in rank
    order (chunks are contiguous: rank ``j`` holds ``[start_j, start_j + lengths[j])``), and which
    rank this is."""

    lengths: tuple[int, ...]
    rank: int

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not 0 <= self.rank < len(self.lengths):
            raise ValueError(f"rank {self.rank} is not in a group of {len(self.lengths)}")
        empty = [j for j, n in enumerate(self.lengths) if n < 1]
        if empty:
            raise ValueError(
                f"sequence chunks {list(self.lengths)}: rank(s) {empty} hold no position; every rank "
                "of the sequence group needs at least one (use a longer sequence or a smaller group)")

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def bounds(self, j: int) -> tuple[int, int]:
        """Global ``[start, stop)`` of rank ``j``'s chunk."""
        start = sum(self.lengths[:j])
        return start, start + self.lengths[j]

    @property
    def start(self) -> int:
        return self.bounds(self.rank)[0]


@dataclass(frozen=True)
class Piece:
    """Rows that rank ``src`` holds of one spanning segment, for one head offset: a view of the
    *source's* chunk ``[B, N_src, H, *]`` (``block``), slots ``j0 .. j0 + block.length`` of the
    segment's selected rows."""

    src: int
    j0: int
    block: Block


@dataclass(frozen=True)
class SpanCall:
    """One kernel call of a segment that spans ranks: this rank's queries (``query``, a view of
    its own chunk) against the keys of ``pieces`` (in position order; one is this rank's own).
    With a causal mask the keys end with this rank's own rows, so the call is a rectangular
    block whose queries are its last ``query.length`` keys."""

    branch: int
    query: Block
    pieces: tuple[Piece, ...]
    own: int  # index of this rank's own piece (its rows are the queries)

    @property
    def key_length(self) -> int:
        return sum(p.block.length for p in self.pieces)


@dataclass(frozen=True)
class ShardPlan:
    """Everything one rank runs: ``local`` blocks (strided plan of each branch's segments that
    lie in its chunk) and ``calls`` (spanning segments). ``sends[dst]``: the pieces of this
    rank's chunk that rank ``dst`` needs; ``receives[src]``: ``(call, piece)`` indices into
    ``calls`` of the pieces rank ``src`` sends here; both in the order they travel.
    ``communicates`` is the same on every rank: whether any rank of the group needs rows of
    another (then one exchange runs per forward and one per backward)."""

    local: tuple[tuple[int, Block], ...]
    calls: tuple[SpanCall, ...]
    sends: tuple[tuple[Piece, ...], ...]
    receives: tuple[tuple[tuple[int, int], ...], ...]
    communicates: bool


def _rows(base: int, lo: int, hi: int, o: int, r: int, count: int) -> tuple[int, int]:
    """Slots ``[j0, j1)`` of the rows ``base + o + j*r`` (``j < count``) that lie in ``[lo, hi)``."""
    j0 = max(0, -(-(lo - base - o) // r))
    j1 = min(count, max(0, -(-(hi - base - o) // r)))
    return j0, max(j0, j1)


def _interior(a: int, b: int, n: int, w: int) -> tuple[int, int]:
    """Global ``[lo, hi)`` covered by the segments of width ``w`` that lie inside ``[a, b)``."""
    lo = -(-a // w) * w
    hi = n if b == n else b // w * w
    return lo, max(lo, hi)


def _span_calls(pattern: DilationPattern, layout: SequenceLayout, heads: int, bsz: int, causal: bool):
    """This rank's :class:`SpanCall` s, in a fixed order (branch, segment, head offset)."""
    n = layout.total
    a, b = layout.bounds(layout.rank)
    bounds = [layout.bounds(j) for j in range(len(layout.lengths))]
    calls = []
    for i, (w, r) in enumerate(branch_order(pattern)):
        lo, hi = _interior(a, b, n, w)
        segs = sorted({a // w, (b - 1) // w} - set(range(lo // w, -(-hi // w)) if hi > lo else set()))
        for s in segs:
            base, end = s * w, min((s + 1) * w, n)
            holders = [j for j, (u, v) in enumerate(bounds) if u < end and v > base]
            for o in range(min(r, heads)):
                count = -(-(end - base - o) // r) if end - base > o else 0
                g = len(range(o, heads, r))
                pieces, own = [], None
                for j in holders:
                    u, v = bounds[j]
                    j0, j1 = _rows(base, max(u, base), min(v, end), o, r, count)
                    if j1 == j0 or (causal and j > layout.rank):
                        continue
                    first = base + o + j0 * r - u  # the piece's first row, in rank j's chunk
                    pieces.append(Piece(j, j0, Block(None, first - o, o, r, bsz, v - u, j1 - j0, g)))
                    if j == layout.rank:
                        own = len(pieces) - 1
                if own is not None:
                    calls.append(SpanCall(i, pieces[own].block, tuple(pieces), own))
    return calls


@functools.lru_cache(maxsize=64)
def shard_plan(pattern: DilationPattern, layout: SequenceLayout, heads: int, bsz: int, causal: bool,
               max_rows: int = MAX_ROWS_PER_CALL) -> ShardPlan:
    """The :class:`ShardPlan` of ``layout.rank`` for a ``[bsz, lengths[rank], heads, D]`` chunk."""
    n, (a, b), me = layout.total, layout.bounds(layout.rank), layout.rank
    local = []
    for i, (w, r) in enumerate(branch_order(pattern)):
        lo, hi = _interior(a, b, n, w)
        if hi > lo:
            for blk in plan_branch(b - a, heads, w, r, bsz, lo - a, hi - a):
                local += [(i, sub) for sub in split_block(blk, max_rows)]
    group = len(layout.lengths)
    every = [_span_calls(pattern, SequenceLayout(layout.lengths, j), heads, bsz, causal) for j in range(group)]
    sends = tuple(tuple(p for c in every[dst] for p in c.pieces if p.src == me) if dst != me else ()
                  for dst in range(group))
    receives = tuple(tuple((ci, pi) for ci, c in enumerate(every[me]) for pi, p in enumerate(c.pieces)
                           if p.src == src) if src != me else () for src in range(group))
    communicates = any(p.src != j for j, cs in enumerate(every) for c in cs for p in c.pieces)
    return ShardPlan(tuple(local), tuple(every[me]), sends, receives, communicates)
