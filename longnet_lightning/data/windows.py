"""Windows of ``seq_len + 1`` tokens cut from a split's token file, and the evaluation protocol.

A batch item is ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with T = seq_len,
``labels[t] = tokens[t + 1]``, and ``IGNORE_INDEX`` (-100) for a target that is not scored.

A "sequence" is one document (``pack_documents=False``) or the whole split with an EOS after
each document (``pack_documents=True``). Training draws windows uniformly over every valid
start of every sequence long enough (:class:`TrainWindows`). Evaluation scores every target of
every sequence exactly once, by the one window function :func:`context_windows`, which serves
validation/test here (:class:`EvalWindows`, stride = T, shorter windows right-padded with EOS
inputs and -100 labels) and ``python -m longnet_lightning evaluate`` (any context and stride):

- A sequence of ``n`` tokens has ``n - 1`` targets: every token but its first, each predicted
  from the tokens before it *inside the same window* (windows never cross sequences).
- Context ``c``, stride ``s`` (``1 <= s <= c``; ``s = c`` is non-overlapping windows). The first
  window reads the sequence's first ``c + 1`` tokens and scores all ``c`` of its targets. Each next
  window ends ``s`` targets later, reads the ``c`` tokens before its last target and scores only
  its last ``s`` targets, so every such target has at least ``c - s`` tokens of context. The final
  window is aligned to the sequence's end and scores only the targets not scored yet.
- A sequence with ``n - 1 <= c`` targets (fewer than ``c + 1`` tokens) is one shorter window
  scoring all its targets; the caller counts and reports such sequences.

The *position* of a target is how many tokens it is predicted from: the target at window index
``j`` (0-based, input ``x[j]``, label ``x[j + 1]``) has position ``j + 1``, from 1 to ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..model import IGNORE_INDEX
from .cache import SplitTokens


def sequences(split: SplitTokens, pack_documents: bool) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) int64 [n_seq]: the documents, or one packed sequence covering the whole file."""
    if pack_documents:
        return np.zeros(1, dtype=np.int64), np.asarray([split.n_tokens], dtype=np.int64)
    return split.offsets, split.lengths


def valid_start_counts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """int64 [n_seq]: how many windows of seq_len + 1 tokens fit in each sequence (0 if too short)."""
    return np.maximum(np.asarray(lengths, dtype=np.int64) - seq_len, 0)


# Columns of the window table returned by `context_windows` (below).
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


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """int64 [min(n, k)]: k indices spread evenly over range(n) (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(k, dtype=np.int64) * n) // k


def eval_rows(offsets: np.ndarray, lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """int64 ``[n_windows, 3]`` rows ``(start, n_tokens, n_masked)`` of :func:`context_windows` with
    stride = seq_len, in token-file coordinates: a window reads ``n_tokens <= seq_len + 1`` tokens at
    ``start``; its first ``n_masked`` labels were scored by the previous window (set to -100)."""
    rows = context_windows(lengths, seq_len)
    out = np.empty((len(rows), 3), dtype=np.int64)
    out[:, 0] = np.asarray(offsets, dtype=np.int64)[rows[:, DOC]] + rows[:, START]
    out[:, 1] = rows[:, LENGTH] + 1
    out[:, 2] = rows[:, LENGTH] - rows[:, SCORED]
    return out


class _TokenFileDataset(Dataset):
    """Holds a token file's path; the memmap is opened lazily in each process (never pickled)."""

    def __init__(self, split: SplitTokens, seq_len: int, eos_id: int):
        self.path, self.dtype, self.n_tokens = split.path, split.dtype, split.n_tokens
        self.seq_len, self.eos_id = seq_len, eos_id
        self._tokens: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._tokens

    def _item(self, start: int, n: int, n_masked: int) -> dict[str, torch.Tensor]:
        """Window of n tokens at `start`, padded to seq_len + 1; first n_masked and padded labels -100."""
        x = np.full(self.seq_len + 1, self.eos_id, dtype=np.int64)
        x[:n] = self.tokens[start : start + n]
        x = torch.from_numpy(x)
        labels = x[1:].clone()
        labels[:n_masked] = IGNORE_INDEX
        labels[n - 1 :] = IGNORE_INDEX
        return {"input_ids": x[:-1], "labels": labels}


class TrainWindows(_TokenFileDataset):
    """All windows of seq_len + 1 tokens inside the split's sequences; item i is the i-th valid start.

    Sequences shorter than seq_len + 1 contribute no window (counted in skipped_docs, skipped_tokens).
    """

    def __init__(self, split: SplitTokens, seq_len: int, eos_id: int, pack_documents: bool = False):
        super().__init__(split, seq_len, eos_id)
        self.offsets, lengths = sequences(split, pack_documents)
        counts = valid_start_counts(lengths, seq_len)
        self.cum = np.cumsum(counts)
        self.first = self.cum - counts  # item index of each sequence's first window
        self.skipped_docs = int((counts == 0).sum())
        self.skipped_tokens = int(lengths[counts == 0].sum())

    def __len__(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def start_of(self, i: int) -> int:
        """Token offset of window i."""
        s = int(np.searchsorted(self.cum, i, side="right"))
        return int(self.offsets[s] + i - self.first[s])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        return self._item(self.start_of(i), self.seq_len + 1, 0)


class EvalWindows(_TokenFileDataset):
    """Deterministic windows scoring each target once (see `eval_windows`), optionally an even subset."""

    def __init__(
        self,
        split: SplitTokens,
        seq_len: int,
        eos_id: int,
        pack_documents: bool = False,
        max_windows: int | None = None,
    ):
        super().__init__(split, seq_len, eos_id)
        windows = eval_rows(*sequences(split, pack_documents), seq_len)
        self.total_windows = len(windows)
        self.windows = windows[evenly_spaced(len(windows), max_windows)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, n, masked = self.windows[i].tolist()
        return self._item(start, n, masked)


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """(num_replicas, rank), read from torch.distributed when not given and initialised, else (1, 0)."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    return num_replicas, rank


class RandomWindowSampler(DistributedSampler):
    """Indices of `num_samples` random windows per epoch, uniform over the dataset, one shard per rank.

    Epoch e draws the same global list for a given (seed, e) whatever the number of ranks; rank r
    takes every num_replicas-th entry from r. It subclasses DistributedSampler so Lightning keeps it
    (instead of wrapping it) under DDP. `start_at(k)` makes the next iteration skip k indices.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_samples: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.per_rank = math.ceil(num_samples / num_replicas)
        self._start = 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """int64 [per_rank * num_replicas]: every rank's indices of `epoch`, interleaved."""
        rng = np.random.default_rng([self.seed, epoch])
        return rng.integers(0, len(self.dataset), size=self.per_rank * self.num_replicas, dtype=np.int64)

    def start_at(self, k: int) -> None:
        self._start = k

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.epoch_indices(self.epoch)[self.rank :: self.num_replicas][start:].tolist())

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(DistributedSampler):
    """Contiguous, unpadded shards of range(len(dataset)) in order: every index on exactly one rank.

    (Lightning's default DistributedSampler pads with repeats, which would score some windows twice.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        self.lo, self.hi = n * rank // num_replicas, n * (rank + 1) // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.lo, self.hi))

    def __len__(self) -> int:
        return self.hi - self.lo


class ResumableDataLoader(DataLoader):
    """A DataLoader over a RandomWindowSampler whose position is saved in Lightning checkpoints.

    Lightning 2.x calls ``state_dict()`` on each train dataloader when it saves a checkpoint and
    ``load_state_dict()`` before iterating again on resume. The state is (epoch, batches yielded).
    On the next iteration in the same epoch the sampler skips those batches' indices (no data is
    read for them), so the remaining batches are exactly those an uninterrupted run would see.
    """

    _epoch: int = 0
    _yielded: int = 0
    _pending: dict | None = None

    def __iter__(self) -> Iterator:
        return self._iterate()  # a generator: the sampler epoch is read at the first batch, after set_epoch

    def _iterate(self) -> Iterator:
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        skip = 0
        if self._pending is not None and self._pending["epoch"] == epoch:
            skip = self._pending["batches"]
        self._pending = None
        if skip:
            sampler.start_at(skip * self.batch_size)
        self._epoch, self._yielded = epoch, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches") and not hasattr(self.sampler, "start_at"):
            raise ValueError(f"cannot resume mid-epoch: sampler {type(self.sampler).__name__} has no start_at().")
        self._pending = dict(state)
