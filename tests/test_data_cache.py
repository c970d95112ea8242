"""Token cache: keyed by every input, rebuilt only on change, never read half-written; document splits."""

import os

import numpy as np
import pytest

from longnet_lightning.data import ByteTokenizer, Corpus, SplitSpec, TokenCache, build_token_cache, cache_root
from longnet_lightning.data import cache as cache_mod
from longnet_lightning.data.cache import token_cache_path, token_dtype

SPLIT = SplitSpec(val_fraction=0.2, test_fraction=0.2, seed=3)


def write_corpus(folder, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld " * (i + 1))
    return Corpus.from_paths(str(folder))


class CountingByteTokenizer(ByteTokenizer):
    """Byte tokenizer that counts encoded documents, and can fail after `fail_after` of them."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def encode(self, text):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return super().encode(text)


def test_cache_content_matches_the_documents(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    cache = build_token_cache(corpus, ByteTokenizer(), SPLIT, tmp_path / "cache")
    assert cache.index["dtype"] == "uint16" and cache.index["bytes_exact"]
    texts = {d.name: d.text for d in corpus.documents()}
    seen = []
    for name in ("train", "val", "test"):
        s = cache.split(name)
        tokens = s.tokens()
        assert s.n_tokens == s.lengths.sum() + len(s.names) == len(tokens)
        for doc, off, n, nbytes in zip(s.names, s.offsets, s.lengths, s.nbytes):
            assert bytes(tokens[off : off + n].astype(np.uint8)) == texts[doc].encode() and n == nbytes
            assert tokens[off + n] == ByteTokenizer.eos_id  # every document is followed by EOS
        seen += s.names
    assert sorted(seen) == sorted(texts)  # every document in exactly one split


def test_cache_is_reused_until_an_input_changes(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    root = tmp_path / "cache"
    tok = CountingByteTokenizer()
    first = build_token_cache(corpus, tok, SPLIT, root)
    assert tok.calls == 30
    again = build_token_cache(corpus, tok, SPLIT, root)
    assert tok.calls == 30 and again.path == first.path  # nothing re-tokenised

    keys = {first.path}
    f = tmp_path / "c" / "doc03.txt"
    f.write_text("changed text")  # content and size
    keys.add(token_cache_path(corpus, tok, SPLIT, root))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime only
    keys.add(token_cache_path(corpus, tok, SPLIT, root))
    (tmp_path / "c" / "new.txt").write_text("a new file")
    keys.add(token_cache_path(corpus, tok, SPLIT, root))
    keys.add(token_cache_path(corpus, tok, SplitSpec(0.2, 0.2, seed=4), root))
    keys.add(token_cache_path(Corpus.from_paths(str(tmp_path / "c"), format="text"), tok, SPLIT, root))
    assert len(keys) == 6

    rebuilt = build_token_cache(corpus, tok, SPLIT, root)
    assert rebuilt.path != first.path and tok.calls == 30 + 31
    assert "new.txt" in str(rebuilt.index["splits"])


def test_interrupted_build_leaves_nothing_that_is_read(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(corpus, CountingByteTokenizer(fail_after=12), SPLIT, root)
    assert list(root.iterdir()) == []  # no final folder, temporary folder removed

    # a process killed outright leaves its temporary folder behind: it is never read
    final = token_cache_path(corpus, ByteTokenizer(), SPLIT, root)
    stale = root / f".{final.name}.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\x00\x00" * 7)
    cache = build_token_cache(corpus, ByteTokenizer(), SPLIT, root)
    assert cache.path == final and cache.split("train").n_tokens > 7

    # a final folder that lost its index (damaged by hand) is rebuilt, not trusted
    (final / "index.json").unlink()
    with pytest.raises(ValueError, match="no index.json"):
        TokenCache.open(final)
    rebuilt = build_token_cache(corpus, ByteTokenizer(), SPLIT, root)
    assert rebuilt.split("train").n_tokens == cache.split("train").n_tokens
    (final / "val.bin").write_bytes(b"\x01")  # truncated token file
    with pytest.raises(ValueError, match="holds 1 bytes"):
        TokenCache.open(final)


def test_cache_dir_setting_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGNET_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LONGNET_CACHE")
    assert cache_root() == cache_mod.Path.home() / ".cache" / "longnet_lightning"


def test_splits_are_disjoint_deterministic_and_proportional():
    names = [f"file{i}.txt" for i in range(2000)]
    spec = SplitSpec(val_fraction=0.1, test_fraction=0.05, seed=7)
    splits = np.array([spec.split_of(n) for n in names])
    assert splits.tolist() == [SplitSpec(0.1, 0.05, seed=7).split_of(n) for n in names]
    counts = np.bincount(splits, minlength=3)
    assert 0.08 < counts[1] / 2000 < 0.12 and 0.035 < counts[2] / 2000 < 0.065
    other = np.array([SplitSpec(0.1, 0.05, seed=8).split_of(n) for n in names])
    assert (other != splits).any()  # the seed matters
    assert all(SplitSpec(0.0, 0.0).split_of(n) == 0 for n in names)


def test_empty_split_is_an_error_that_says_what_to_change(tmp_path):
    corpus = write_corpus(tmp_path / "c", n=3)
    with pytest.raises(ValueError, match=r"the val split is empty: 3 documents are too few.*raise val_fraction"):
        build_token_cache(corpus, ByteTokenizer(), SplitSpec(1e-9, 0.0), tmp_path / "cache")
    carved = build_token_cache(corpus, ByteTokenizer(), SplitSpec(0.2, 0.0, seed=1), tmp_path / "cache")
    if carved.index["split_mode"] == "tokens":  # too few documents: val is the last 20% of each one's tokens
        assert all(name.endswith("@val") for name in carved.split("val").names)
    build_token_cache(corpus, ByteTokenizer(), SplitSpec(0.0, 0.0), tmp_path / "cache")  # fine without val


@pytest.mark.parametrize(
    "kw, setting", [({"val_fraction": 1.0}, "val_fraction=1.0"), ({"test_fraction": -0.1}, "test_fraction=-0.1"),
                    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction")]
)  # fmt: skip
def test_bad_fractions(kw, setting):
    with pytest.raises(ValueError, match=setting):
        SplitSpec(**kw)


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
    class Inconsistent(ByteTokenizer):
        vocab_size, eos_id = 100, 99  # claims fewer ids than it produces

    corpus = write_corpus(tmp_path / "c", n=5)
    with pytest.raises(ValueError, match="outside its vocabulary of 100.*fix or replace it"):
        build_token_cache(corpus, Inconsistent(), SplitSpec(0, 0), tmp_path / "cache")


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
