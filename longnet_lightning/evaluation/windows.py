"""Which tokens each evaluation window reads and scores, and the log-spaced position buckets.

The protocol (the same for every context length, so all columns score the same targets):

- A document of ``n`` tokens has ``n - 1`` targets: every token but its first, each predicted
  from the tokens before it *inside the same window* (windows never cross documents).
- Context ``c``, stride ``s`` (``1 <= s <= c``; ``s = c`` is non-overlapping windows). The first
  window reads the document's first ``c + 1`` tokens and scores all ``c`` of its targets. Each next
  window ends ``s`` targets later, reads the ``c`` tokens before its last target and scores only
  its last ``s`` targets, so every such target has at least ``c - s`` tokens of context. The final
  window is aligned to the document's end and scores only the targets not scored yet.
- A document with ``n - 1 <= c`` targets (fewer than ``c + 1`` tokens) is one shorter window
  scoring all its targets; the caller counts and reports such documents.

The *position* of a target is how many tokens it is predicted from: the target at window index
``j`` (0-based, input ``x[j]``, label ``x[j + 1]``) has position ``j + 1``, from 1 to ``c``.
"""
from __future__ import annotations

import math

import numpy as np

# Columns of the window table returned by `context_windows`.
DOC, START, LENGTH, SCORED = range(4)


def context_windows(lengths, context: int, stride: int | None = None) -> np.ndarray:
    """int64 ``[n_windows, 4]`` rows ``(doc, start, length, n_scored)`` scoring each target once.

    Window row: document index ``doc``; it reads tokens ``start .. start + length`` (``length + 1``
    tokens: ``length`` inputs and their ``length`` labels) of that document and scores the last
    ``n_scored`` of its ``length`` targets. ``lengths``: tokens per document. Documents with fewer
    than 2 tokens have no target and no window.
    """
    c = int(context)
    s = c if stride is None else int(stride)
    if c < 1:
        raise ValueError(f"context length {c} must be at least 1 token.")
    if not 1 <= s <= c:
        raise ValueError(f"stride {s} must be between 1 and the context length {c}.")
    rows = []
    for d, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        targets = n - 1
        if targets < 1:
            continue
        if targets <= c:  # the whole document fits in one (possibly shorter) window
            rows.append(np.asarray([[d, 0, targets, targets]], dtype=np.int64))
            continue
        k = (targets - c) // s  # full strided windows after the first
        ends = c + s * np.arange(k + 1, dtype=np.int64)  # last target of each window
        block = np.empty((k + 1, 4), dtype=np.int64)
        block[:, DOC], block[:, START], block[:, LENGTH] = d, ends - c, c
        block[:, SCORED] = s
        block[0, SCORED] = c
        rows.append(block)
        rest = targets - int(ends[-1])
        if rest:  # aligned to the end of the document; scores what is left
            rows.append(np.asarray([[d, targets - c, c, rest]], dtype=np.int64))
    return np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)


def bucket_edges(max_position: int, per_octave: int = 1) -> np.ndarray:
    """int64 upper edges ``hi_0 < hi_1 < ... = max_position`` of log-spaced position buckets.

    Bucket ``i`` holds positions ``hi_{i-1} + 1 .. hi_i`` (``hi_{-1} = 0``). With ``per_octave=1``
    the edges are 1, 2, 4, 8, ...: positions 1, 2, 3-4, 5-8, ..., and a last bucket ending at
    ``max_position``. ``per_octave=k`` splits every doubling into k buckets (merging any that
    would be empty at small positions).
    """
    if max_position < 1:
        raise ValueError(f"max_position={max_position} must be at least 1.")
    if per_octave < 1:
        raise ValueError(f"buckets per doubling ({per_octave}) must be at least 1.")
    steps = int(math.ceil(math.log2(max_position) * per_octave)) if max_position > 1 else 0
    his = np.floor(2.0 ** (np.arange(steps + 1) / per_octave) + 1e-9).astype(np.int64)
    his = np.unique(np.minimum(his, max_position))
    if his[-1] != max_position:
        his = np.append(his, max_position)
    return his


def bucketize(nll_sum: np.ndarray, count: np.ndarray, edges: np.ndarray) -> list[dict]:
    """Per-position sums (index j = position j + 1) grouped into buckets with at least one target.

    Returns dicts ``{"start", "end", "mean_nll", "count", "nll_sum"}``; ``start``/``end`` are the
    first and last position of the bucket that this context length can have (``end <= len(count)``).
    """
    out = []
    lo = 1
    n = len(count)
    for hi in np.asarray(edges).tolist():
        if lo > n:
            break
        end = min(hi, n)
        cnt = int(count[lo - 1 : end].sum())
        if cnt:
            total = float(nll_sum[lo - 1 : end].sum())
            out.append({"start": lo, "end": end, "mean_nll": total / cnt, "count": cnt, "nll_sum": total})
        lo = hi + 1
    return out
