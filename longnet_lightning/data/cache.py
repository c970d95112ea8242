"""Tokenise a corpus once into memory-mapped token files, one per split, plus a small JSON index.

Layout of ``<cache_dir>/tokens-<key>/``::

    train.bin, val.bin, test.bin   tokens of each split's documents, each document followed by EOS
    manifest.json                  what the corpus is (`Corpus.corpus_manifest`): for site-packages
                                   every document's distribution and version, and what each rule left out
    index.json                     written last: names, offsets, lengths, UTF-8 bytes per document

The key hashes everything the tokens depend on: the source files (absolute path, name, size,
mtime), format, text_field, errors, the tokenizer fingerprint and the split settings. A cache is
built in a temporary folder and renamed into place in one step, so an interrupted build leaves
no folder under the final name and is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import sources as _sources
from .sources import (
    BUILTIN_CORPORA,
    ERRORS,
    FORMATS,
    Document,
    SitePackagesScan,
    _candidate_stats,
    _scan_candidates,
    _site_packages_candidates,
    read_documents,
    read_site_packages_corpus,
    resolve_sources,
    stdlib_corpus_files,
    stdlib_root,
)
from .tokenizers import HFTokenizer, Tokenizer, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
ENV_CACHE_DIR = "LONGNET_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $LONGNET_CACHE, else ~/.cache/longnet_lightning."""
    root = cache_dir or os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "longnet_lightning"
    return Path(root).expanduser()


def _hash(obj) -> str:
    """16 hex digits of the SHA-256 of `obj` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _size_and_mtime(path: Path) -> tuple[int, int]:
    """Size and newest modification time of a file, or of every file under a folder (a saved
    Hugging Face dataset is one source)."""
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
    return sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)


@dataclass(frozen=True)
class Corpus:
    """Which documents to read, and how: ``paths`` (files, folders, globs), or a built-in corpus
    named by ``builtin`` ('stdlib' or 'site-packages'; with paths=None it defaults to 'stdlib')."""

    paths: tuple[str, ...] | None = None
    format: str = "auto"
    text_field: str = "text"
    errors: str = "strict"
    builtin: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is not supported; use one of {list(FORMATS)}.")
        if self.errors not in ERRORS:
            raise ValueError(f"errors={self.errors!r} is not supported; use one of {list(ERRORS)}.")
        if self.builtin is not None and self.builtin not in BUILTIN_CORPORA:
            raise ValueError(f"builtin={self.builtin!r} is not a built-in corpus; use one of {list(BUILTIN_CORPORA)}.")
        if self.paths is not None and self.builtin is not None:
            raise ValueError(f"paths and builtin={self.builtin!r} both choose the corpus; give one of them.")
        if self.paths is None and self.builtin is None:
            # frozen: normalise once, so Corpus() == Corpus(builtin="stdlib")
            object.__setattr__(self, "builtin", "stdlib")

    @classmethod
    def from_paths(cls, paths: str | os.PathLike | list | tuple | None, **kw) -> Corpus:
        if paths is not None:
            paths = (os.fspath(paths),) if isinstance(paths, (str, os.PathLike)) else tuple(map(os.fspath, paths))
        return cls(paths, **kw)

    @cached_property
    def _site_candidates(self):
        """The site-packages files the name and size rules keep, listed once per Corpus (no file read)."""
        return _site_packages_candidates(_sources.site_packages_roots())  # looked up at call time (tests patch it)

    @cached_property
    def _site_packages(self) -> SitePackagesScan:
        """The site-packages selection, made once per Corpus (it reads every candidate file)."""
        return _scan_candidates(self._site_candidates)

    def files(self) -> list[tuple[str, Path]]:
        """(name, absolute path) of every file read, in reading order."""
        if self.builtin == "stdlib":
            return [(name, f) for name, fs in stdlib_corpus_files().items() for f in fs]
        if self.builtin == "site-packages":
            return [(name, f) for name, fs in self._site_packages.files.items() for f in fs]
        return [(s.name, s.path) for s in resolve_sources(self.paths, self.format)]

    def _settings(self) -> dict:
        """The settings hashed into the fingerprint; paths and the stdlib corpus keep the key they
        had before ``builtin`` existed (their token caches stay valid)."""
        settings = asdict(self)
        if settings["builtin"] in (None, "stdlib"):
            del settings["builtin"]
        return settings

    def fingerprint(self) -> str:
        """Hash of the settings and of each file's path, size and modification time (for
        site-packages: of every candidate file before the content rules, and of the installed
        distributions' metadata folders, so nothing is read to compute it)."""
        if self.builtin == "site-packages":
            return _hash({"settings": self._settings(), "site_packages": _candidate_stats(self._site_candidates)})
        stats = [(n, str(p), *_size_and_mtime(p)) for n, p in self.files()]
        return _hash({"settings": self._settings(), "files": stats})

    def total_bytes(self) -> int:
        return sum(_size_and_mtime(p)[0] for _, p in self.files())

    def documents(self) -> Iterator[Document]:
        if self.builtin == "site-packages":
            return read_site_packages_corpus(errors=self.errors, scan=self._site_packages)
        return read_documents(self.paths, self.format, self.text_field, self.errors)

    def corpus_manifest(self) -> dict:
        """What this corpus is, as a JSON-ready dict for reports (also written to each token
        cache's manifest.json). For site-packages: `SitePackagesManifest.to_dict` (per document
        its distribution, version, files and bytes; files and bytes left out per rule; roots,
        Python version); for stdlib: the Python version, its folder and per document files and
        bytes; for paths: the paths, files and bytes."""
        if self.builtin == "site-packages":
            return self._site_packages.manifest.to_dict()
        sizes: dict[str, list[int]] = {}
        for name, path in self.files():
            entry = sizes.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += _size_and_mtime(path)[0]
        out = {"corpus": self.builtin or "paths", "n_files": sum(f for f, _ in sizes.values()),
               "bytes": sum(b for _, b in sizes.values())}
        if self.builtin == "stdlib":
            documents = [{"name": n, "files": f, "bytes": b} for n, (f, b) in sizes.items()]
            return {**out, "python": platform.python_version(), "root": str(stdlib_root()),
                    "n_documents": len(documents), "documents": documents}
        return {**out, "paths": list(self.paths), "format": self.format}


@dataclass(frozen=True)
class SplitSpec:
    """Document-level split settings: each document goes to one split by a hash of (name, seed)."""

    val_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 1234

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}={v} must be in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves no training data; "
                "keep their sum below 1."
            )

    def split_of(self, name: str) -> int:
        """0 (train), 1 (val) or 2 (test) for a document name; stable across runs and machines."""
        digest = hashlib.sha256(f"{self.seed}\0{name}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2.0**64
        return 2 if u < self.test_fraction else 1 if u < self.test_fraction + self.val_fraction else 0

    def empty_eval_splits(self, counts: list[int]) -> list[str]:
        """'val'/'test' when that split has a positive fraction but got no document."""
        return [s for i, s in enumerate(SPLITS[1:], 1) if getattr(self, f"{s}_fraction") > 0 and counts[i] == 0]

    def check_counts(self, counts: list[int], train_only: bool = False) -> None:
        """ValueError if a split with a positive fraction (or train) got no document
        (``train_only``: only an empty training split is an error)."""
        total = sum(counts)
        for i, split in enumerate(SPLITS[:1] if train_only else SPLITS):
            frac = 1.0 if split == "train" else getattr(self, f"{split}_fraction")
            if frac > 0 and counts[i] == 0:
                fix = (
                    "lower val_fraction/test_fraction"
                    if split == "train"
                    else f"raise {split}_fraction, change seed, split the text into more documents, "
                    f"or set {split}_fraction=0"
                )
                raise ValueError(
                    f"the {split} split is empty: {total} documents were split {dict(zip(SPLITS, counts))} with "
                    f"val_fraction={self.val_fraction}, test_fraction={self.test_fraction}, seed={self.seed}; {fix}."
                )


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ----------------------------------------------------------------------------- BPE tokenizer cache


def bpe_cache_path(corpus: Corpus, split: SplitSpec, vocab_size: int, cache_dir=None) -> Path:
    """Where the BPE trained on this corpus's training split with these settings is stored."""
    import tokenizers

    key = _hash([CACHE_VERSION, corpus.fingerprint(), asdict(split), vocab_size, tokenizers.__version__])
    return cache_root(cache_dir) / f"bpe-{key}.json"


def load_or_train_bpe(corpus: Corpus, split: SplitSpec, vocab_size: int, cache_dir=None) -> HFTokenizer:
    """Byte-level BPE trained on the TRAINING split only; trained once, then read from the cache."""
    path = bpe_cache_path(corpus, split, vocab_size, cache_dir)
    if path.is_file():
        return load_tokenizer(json.loads(path.read_text()))
    counts = [0, 0, 0]

    def train_texts() -> Iterator[str]:
        for doc in corpus.documents():
            s = split.split_of(doc.name)
            counts[s] += 1
            if s == 0:
                yield doc.text

    log.info("training a %d-token byte-level BPE on the training split (cached at %s)", vocab_size, path)
    tok = train_bpe(train_texts(), vocab_size)
    split.check_counts(counts, train_only=True)  # too few documents: eval splits are token ranges
    _atomic_write_text(path, json.dumps(tok.spec()))
    return tok


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- token cache


@dataclass
class SplitTokens:
    """One split: its token file and per-document offsets/lengths (tokens, EOS excluded) and UTF-8 bytes."""

    path: Path
    dtype: np.dtype
    names: list[str]
    offsets: np.ndarray  # int64 [n_docs]
    lengths: np.ndarray  # int64 [n_docs]
    nbytes: np.ndarray  # int64 [n_docs]
    n_tokens: int  # tokens in the file = sum(lengths) + n_docs (one EOS after each document)

    def tokens(self) -> np.ndarray:
        """The split's token file as a read-only memmap [n_tokens]."""
        if self.n_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


@dataclass
class TokenCache:
    """A finished cache folder, read through its index."""

    path: Path
    index: dict

    @classmethod
    def open(cls, path: Path) -> TokenCache:
        """Read and check a cache folder; ValueError if it is incomplete or inconsistent."""
        index_file = path / "index.json"
        if not index_file.is_file():
            raise ValueError(f"{path} has no index.json (incomplete cache).")
        index = json.loads(index_file.read_text())
        cache = cls(path, index)
        for name in SPLITS:
            s = cache.split(name)
            size = s.path.stat().st_size if s.path.exists() else -1
            if size != s.n_tokens * s.dtype.itemsize:
                raise ValueError(f"{s.path} holds {size} bytes, index says {s.n_tokens} tokens of {s.dtype}.")
        return cache

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @cached_property
    def manifest(self) -> dict | None:
        """The corpus manifest written with the cache (`Corpus.corpus_manifest`); None for a cache
        built before manifests were written."""
        path = self.path / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def eos_id(self) -> int:
        return self.index["eos_id"]

    @cached_property
    def _splits(self) -> dict[str, SplitTokens]:
        dtype = np.dtype(self.index["dtype"])
        out = {}
        for name in SPLITS:
            d = self.index["splits"][name]
            out[name] = SplitTokens(
                self.path / f"{name}.bin",
                dtype,
                d["names"],
                np.asarray(d["offsets"], dtype=np.int64),
                np.asarray(d["lengths"], dtype=np.int64),
                np.asarray(d["nbytes"], dtype=np.int64),
                d["n_tokens"],
            )
        return out

    def split(self, name: str) -> SplitTokens:
        if name not in SPLITS:
            raise ValueError(f"split {name!r} does not exist; use one of {list(SPLITS)}.")
        return self._splits[name]


def token_cache_path(corpus: Corpus, tokenizer: Tokenizer, split: SplitSpec, cache_dir=None) -> Path:
    key = _hash([CACHE_VERSION, corpus.fingerprint(), tokenizer.fingerprint(), asdict(split)])
    return cache_root(cache_dir) / f"tokens-{key}"


def build_token_cache(
    corpus: Corpus, tokenizer: Tokenizer, split: SplitSpec, cache_dir=None, batch_docs: int = 64
) -> TokenCache:
    """Open the cache for these inputs, building it first if needed (atomically)."""
    final = token_cache_path(corpus, tokenizer, split, cache_dir)
    if final.exists():
        try:
            return TokenCache.open(final)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            log.warning("token cache %s is damaged (%s); rebuilding it", final, e)
            shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        index = _write_tokens(tmp, corpus, tokenizer, split, batch_docs)
        (tmp / "manifest.json").write_text(json.dumps(corpus.corpus_manifest(), indent=1) + "\n")
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "index.json").is_file():
                raise
        log.info("token cache written to %s", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache.open(final)


def _carve_token_ranges(folder: Path, meta: dict, dtype: np.dtype, split: SplitSpec, token_bytes) -> dict:
    """Re-split by token ranges: every document's tokens go, in order, ``1 - val - test`` to
    train, then ``val_fraction`` to val, then ``test_fraction`` to test (pieces named
    ``<name>@train`` etc.), so a corpus of one book still gets validation and test text that
    training never sees. Rewrites folder/{train,val,test}.bin; returns the new index entries."""
    eos = None
    docs = []
    for s in SPLITS:
        m = meta[s]
        if not m["names"]:
            continue
        tokens = np.fromfile(folder / f"{s}.bin", dtype=dtype)
        eos = tokens[m["offsets"][0] + m["lengths"][0]]
        docs += [(name, tokens[o:o + n]) for name, o, n in zip(m["names"], m["offsets"], m["lengths"])]
    docs.sort(key=lambda d: d[0])
    bounds = (0.0, 1.0 - split.val_fraction - split.test_fraction, 1.0 - split.test_fraction, 1.0)
    new = {s: {"names": [], "offsets": [], "lengths": [], "nbytes": [], "n_tokens": 0} for s in SPLITS}
    files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
    eos_bytes = np.asarray([eos], dtype=dtype).tobytes()
    try:
        for name, ids in docs:
            cuts = [round(b * len(ids)) for b in bounds]
            for i, s in enumerate(SPLITS):
                piece = ids[cuts[i]:cuts[i + 1]]
                if s != "train" and getattr(split, f"{s}_fraction") == 0:
                    continue
                m = new[s]
                m["names"].append(f"{name}@{s}")
                m["offsets"].append(m["n_tokens"])
                m["lengths"].append(int(piece.size))
                m["nbytes"].append(int(token_bytes[piece.astype(np.int64)].sum()))
                m["n_tokens"] += int(piece.size) + 1
                files[s].write(piece.tobytes())
                files[s].write(eos_bytes)
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS[1:]:
        if getattr(split, f"{s}_fraction") > 0 and sum(new[s]["lengths"]) < 2:
            raise ValueError(
                f"the {s} split is empty: {len(docs)} documents are too few for document-level splits and "
                f"{s}_fraction={getattr(split, f'{s}_fraction')} of their tokens is under 2 tokens; "
                f"raise {s}_fraction, add text, or set {s}_fraction=0."
            )
    return new


def _batches(docs: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# Per-document arrays are processed in pieces of this many ids: a temporary the size of a 40 MB
# document (int64: 320 MB) is slow to allocate and touch, a 1M-id piece is reused from cache.
_PIECE = 1 << 20


def _token_byte_total(ids: np.ndarray, token_bytes: np.ndarray) -> int:
    """``token_bytes[ids].sum()``, piece by piece."""
    return sum(int(token_bytes[ids[i:i + _PIECE]].sum()) for i in range(0, ids.size, _PIECE))


def _write_ids(f, ids: np.ndarray, dtype: np.dtype) -> None:
    """``f.write(ids.astype(dtype).tobytes())``, piece by piece."""
    for i in range(0, ids.size, _PIECE):
        f.write(ids[i:i + _PIECE].astype(dtype, copy=False))


def _write_tokens(folder: Path, corpus: Corpus, tokenizer: Tokenizer, split: SplitSpec, batch_docs: int) -> dict:
    """Tokenise every document into folder/{train,val,test}.bin; return the index."""
    V, eos = tokenizer.vocab_size, tokenizer.eos_id
    if not 0 <= eos < V:
        raise ValueError(f"tokenizer eos_id={eos} is outside its vocabulary of {V}; fix the tokenizer file.")
    dtype = token_dtype(V)
    token_bytes = tokenizer.token_bytes()
    meta = {s: {"names": [], "offsets": [], "lengths": [], "nbytes": [], "n_tokens": 0} for s in SPLITS}
    files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
    eos_bytes = np.asarray([eos], dtype=dtype).tobytes()
    n_files, total = len(corpus.files()), corpus.total_bytes()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=n_files < 100 and total < 2**24)
    max_id, mismatched = -1, 0
    try:
        for batch in _batches(corpus.documents(), batch_docs):
            for doc, ids in zip(batch, tokenizer.encode_batch_compact([d.text for d in batch])):
                nbytes = len(doc.text.encode("utf-8"))
                if ids.size:
                    max_id = max(max_id, int(ids.max()))
                    if ids.min() < 0 or max_id >= V:
                        raise ValueError(
                            f"tokenizer produced id {max_id if max_id >= V else int(ids.min())} for {doc.name!r}, "
                            f"outside its vocabulary of {V}; the tokenizer file is inconsistent, fix or replace it."
                        )
                mismatched += _token_byte_total(ids, token_bytes) != nbytes
                name = SPLITS[split.split_of(doc.name)]
                m = meta[name]
                m["names"].append(doc.name)
                m["offsets"].append(m["n_tokens"])
                m["lengths"].append(int(ids.size))
                m["nbytes"].append(nbytes)
                m["n_tokens"] += int(ids.size) + 1
                _write_ids(files[name], ids, dtype)
                files[name].write(eos_bytes)
                bar.update(nbytes)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    counts = [len(meta[s]["names"]) for s in SPLITS]
    split.check_counts(counts, train_only=True)
    mode = "documents"
    if split.empty_eval_splits(counts):  # too few documents (one book): carve token ranges instead
        meta, mode = _carve_token_ranges(folder, meta, dtype, split, token_bytes), "tokens"
    if mismatched:
        log.warning(
            "%d documents: token_bytes of their tokens do not add up to their UTF-8 size; "
            "bits per byte is approximate with this tokenizer",
            mismatched,
        )
    return {
        "version": CACHE_VERSION,
        "corpus": asdict(corpus),
        "split": asdict(split),
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": V,
        "eos_id": eos,
        "dtype": dtype.name,
        "max_id": max_id,
        "bytes_exact": mismatched == 0,
        "split_mode": mode,
        "n_documents": sum(counts),
        "splits": meta,
    }
