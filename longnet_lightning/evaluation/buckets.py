"""Log-spaced position buckets of the loss by position (the *position* of a target is how many
tokens it is predicted from: 1 to the context length; see :func:`longnet_lightning.data.windows.context_windows`).
"""
from __future__ import annotations

import math

import numpy as np


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
