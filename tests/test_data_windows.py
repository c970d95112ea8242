"""Windows: evaluation scores every target exactly once; training windows are uniform and deterministic."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_lightning.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    Corpus,
    EvalWindows,
    RandomWindowSampler,
    ShardSampler,
    SplitSpec,
    TrainWindows,
    build_token_cache,
    context_windows,
)
from longnet_lightning.data.windows import eval_rows
from longnet_lightning.metrics import bits_per_byte, label_bytes


def offsets_of(lengths):
    """Offsets of documents laid out with one EOS after each, as in the cache."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths) + 1)[:-1]]).astype(np.int64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=8), st.integers(1, 20))
def test_eval_rows_in_token_file_coordinates_score_each_target_exactly_once(lengths, T):
    offsets = offsets_of(lengths)
    scored = np.zeros(int(offsets[-1] + lengths[-1] + 1), dtype=int)
    for start, n, masked in eval_rows(offsets, np.asarray(lengths), T):
        assert 2 <= n <= T + 1 and 0 <= masked < n - 1
        doc = np.searchsorted(offsets, start, side="right") - 1
        assert start + n <= offsets[doc] + lengths[doc]  # never reads past its document
        scored[start + 1 + masked : start + n] += 1  # target positions of the labels it keeps
    expected = np.zeros_like(scored)
    for off, n in zip(offsets, lengths):
        expected[off + 1 : off + n] = 1  # every token of a document but its first is a target
    assert (scored == expected).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=6), st.integers(1, 24), st.data())
def test_windows_score_every_target_exactly_once(lengths, c, data):
    s = data.draw(st.integers(1, c))
    rows = context_windows(lengths, c, s)
    hits = [np.zeros(n, dtype=int) for n in lengths]
    firsts = set()
    for d, start, length, scored in rows.tolist():
        n = lengths[d]
        assert 1 <= scored <= length <= c and start >= 0 and start + length + 1 <= n  # reads inside its document
        hits[d][start + length - scored + 1 : start + length + 1] += 1  # targets = token indices
        if start == 0:
            firsts.add(d)
            assert scored == length  # the first window scores everything it reads
        else:
            assert length == c and scored <= s  # later windows: full context, at least c - s before each target
        if n - 1 <= c:
            assert (start, length) == (0, n - 1)  # a short document is one shorter window
    for n, h in zip(lengths, hits):
        expected = np.ones(n, dtype=int)
        expected[:1] = 0  # every token but the first is a target
        assert (h == expected).all()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(0)
    for i, n in enumerate([5, 40, 90, 1, 33, 200, 17]):
        (root / f"d{i}.txt").write_text("".join(rng.choice(list("abcdefgh \n"), size=n)))
    return build_token_cache(Corpus.from_paths(str(root)), ByteTokenizer(), SplitSpec(0, 0), root / "cache")


@pytest.mark.parametrize("pack", [False, True])
def test_eval_dataset_labels_are_the_next_tokens(cache, pack):
    split, T = cache.split("train"), 16
    ds = EvalWindows(split, T, ByteTokenizer.eos_id, pack)
    tokens = np.asarray(split.tokens(), dtype=np.int64)
    total = 0
    for i in range(len(ds)):
        item = ds[i]
        start, n, masked = ds.windows[i]
        assert item["input_ids"].shape == item["labels"].shape == (T,)
        assert item["input_ids"][: n - 1].tolist() == tokens[start : start + n - 1].tolist()
        keep = item["labels"] != IGNORE_INDEX
        assert item["labels"][keep].tolist() == tokens[start + 1 + masked : start + n].tolist()
        total += int(keep.sum())
    # the exact rule: unpacked, sum over documents of (length - 1); packed, stream length - 1
    assert total == (split.n_tokens - 1 if pack else int(np.maximum(split.lengths - 1, 0).sum()))


def test_eval_subset_is_even_and_deterministic(cache):
    full = EvalWindows(cache.split("train"), 8, 256)
    part = EvalWindows(cache.split("train"), 8, 256, max_windows=5)
    assert len(part) == 5 and part.total_windows == len(full) > 5
    idx = [np.flatnonzero((full.windows == w).all(1))[0] for w in part.windows]
    assert idx == sorted(idx) and idx[0] == 0 and np.diff(idx).max() - np.diff(idx).min() <= 1


def test_train_windows_cover_exactly_the_valid_starts(cache):
    split, T = cache.split("train"), 16
    ds = TrainWindows(split, T, 256)
    assert len(ds) == int(np.maximum(split.lengths - T, 0).sum())
    assert ds.skipped_docs == int((split.lengths < T + 1).sum()) == 2  # 5 and 1 tokens; 17 = T + 1 fits
    valid = {int(o + j) for o, n in zip(split.offsets, split.lengths) for j in range(max(0, n - T))}
    assert {ds.start_of(i) for i in range(len(ds))} == valid
    tokens = np.asarray(split.tokens(), dtype=np.int64)
    item = ds[len(ds) - 1]
    s = ds.start_of(len(ds) - 1)
    assert item["input_ids"].tolist() == tokens[s : s + T].tolist()
    assert item["labels"].tolist() == tokens[s + 1 : s + T + 1].tolist()
    assert (item["input_ids"] != 256).all()  # unpacked windows never cross a document end
    with pytest.raises(IndexError):
        ds[len(ds)]

    packed = TrainWindows(split, T, 256, pack_documents=True)
    assert len(packed) == split.n_tokens - T and packed.skipped_docs == 0


def test_random_windows_are_deterministic_uniform_and_sharded(cache):
    ds = TrainWindows(cache.split("train"), 16, 256)
    s = RandomWindowSampler(ds, 1000, seed=5, num_replicas=1, rank=0)
    e0 = list(s)
    assert e0 == list(RandomWindowSampler(ds, 1000, seed=5, num_replicas=1, rank=0))
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0
    assert list(RandomWindowSampler(ds, 1000, seed=6, num_replicas=1, rank=0)) != e0
    # uniform over all valid starts, i.e. documents weighted by their number of windows
    frac = np.bincount(np.searchsorted(ds.cum, e0, side="right"), minlength=len(ds.cum)) / 1000
    assert np.abs(frac - np.diff(ds.cum, prepend=0) / len(ds)).max() < 0.06

    shards = [RandomWindowSampler(ds, 999, seed=5, num_replicas=3, rank=r) for r in range(3)]
    assert [len(x) for x in shards] == [333] * 3
    merged = [i for triple in zip(*map(list, shards)) for i in triple]
    assert merged == e0[:999]  # the same global draw, dealt out to ranks
    whole = list(shards[1])
    shards[1].start_at(300)  # resuming: skip what was already consumed, once
    assert list(shards[1]) == whole[300:]
    assert list(shards[1]) == whole


def test_shard_sampler_splits_without_repeats():
    ds = list(range(10))
    parts = [list(ShardSampler(ds, num_replicas=3, rank=r)) for r in range(3)]
    assert sum(parts, []) == ds


def test_bits_per_byte_with_bytes_is_nats_over_ln2_per_byte(cache):
    ds = EvalWindows(cache.split("train"), 16, 256)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    logits = torch.randn(*batch["labels"].shape, 257, generator=torch.Generator().manual_seed(0))
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    n_scored = (batch["labels"] != IGNORE_INDEX).sum()
    n_bytes = label_bytes(batch["labels"], torch.from_numpy(ByteTokenizer().token_bytes()))
    assert n_bytes == n_scored  # one byte per byte token, no EOS target inside documents
    assert torch.allclose(bits_per_byte(nll, n_bytes), nll / n_scored / math.log(2))
    eos = torch.tensor([[256, 97, IGNORE_INDEX]])
    assert label_bytes(eos, torch.from_numpy(ByteTokenizer().token_bytes())) == 1  # EOS carries no bytes
