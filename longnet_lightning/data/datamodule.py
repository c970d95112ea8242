"""LongTextDataModule: long documents -> cached tokens -> windows for training and evaluation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from .cache import Corpus, SplitSpec, TokenCache, build_token_cache, load_or_train_bpe
from .sources import BUILTIN_CORPORA, SitePackagesManifest
from .tokenizers import ByteTokenizer, Tokenizer, build_tokenizer
from .windows import EvalWindows, RandomWindowSampler, ResumableDataLoader, ShardSampler, TrainWindows


def _share(part: int, whole: int) -> str:
    """``part / whole`` as a percentage that never reads 0.0% for a part above zero."""
    frac = part / max(1, whole)
    return "under 0.1%" if 0 < frac < 0.001 else f"{frac:.1%}"


class LongTextDataModule(L.LightningDataModule):
    """Windows of long documents for causal language modelling.

    Batches are ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with T = seq_len and
    labels = inputs shifted by one (-100 = not scored). Validation and test score every target of
    their split exactly once (every token but each sequence's first; see `windows`); training draws
    random windows, deterministic per (seed, epoch) and resumable mid-epoch.

    Args:
        data_path: file, folder (recursive) or glob, or a list of them; None = the built-in corpus
            named by `corpus`.
        corpus: the built-in corpus read when data_path is None: 'stdlib' (default; the Python
            standard library's own sources, see `sources.stdlib_corpus_files`) or 'site-packages'
            (the .py sources of this interpreter's installed packages, one document per top-level
            package, without tests, vendored copies, generated files and duplicates; see
            `sources.scan_site_packages`). Which distribution and version each document comes from,
            and how many files each rule left out, is written to the token cache's manifest.json
            and logged. Giving data_path with corpus='site-packages' is an error.
        format: 'auto' (.jsonl = JSON Lines, .parquet = Parquet, a folder from Hugging Face
            ``save_to_disk`` = that dataset, else plain text), 'text', 'jsonl', 'parquet' or 'hf'
            (Parquet needs the ``[parquet]`` extra, pyarrow; datasets the ``[hf]`` extra).
        text_field: JSON Lines field / Parquet or dataset column holding the text.
        tokenizer: 'byte' (256 bytes + EOS), 'bpe' (byte-level BPE trained on the training split), or
            a path to a Hugging Face tokenizer.json.
        bpe_vocab_size: vocabulary size for tokenizer='bpe'.
        seq_len: tokens per training example (T).
        batch_size: examples per batch (per device).
        num_workers: DataLoader worker processes.
        val_fraction: fraction of documents held out for validation (by hash of name and seed).
        test_fraction: fraction of documents held out for test.
        seed: seed of the split and of the training windows.
        samples_per_epoch: training windows per epoch; default: training tokens // seq_len.
        val_samples: at most this many validation windows, taken evenly; default: all.
        pack_documents: concatenate each split's documents with EOS between them and window the
            stream; if False, windows stay inside documents and training skips shorter documents.
        cache_dir: where token caches live; default $LONGNET_CACHE or ~/.cache/longnet_lightning.
        errors: 'strict' (bytes that are not UTF-8 are an error) or 'replace' (use U+FFFD).
    """

    def __init__(
        self,
        data_path: str | list[str] | None = None,
        corpus: str = "stdlib",
        format: str = "auto",
        text_field: str = "text",
        tokenizer: str = "byte",
        bpe_vocab_size: int = 8192,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 1234,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        pack_documents: bool = False,
        cache_dir: str | None = None,
        errors: str = "strict",
    ):
        super().__init__()
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        for name, value in [("samples_per_epoch", samples_per_epoch), ("val_samples", val_samples)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer, or None for the default.")
        if tokenizer == "bpe" and bpe_vocab_size <= 257:
            raise ValueError(
                f"bpe_vocab_size={bpe_vocab_size} must exceed 257 (256 bytes + EOS); or use tokenizer='byte'."
            )
        if corpus not in BUILTIN_CORPORA:
            raise ValueError(
                f"corpus={corpus!r} is not a built-in corpus; use one of {list(BUILTIN_CORPORA)}, "
                "or data_path for your own files."
            )
        if data_path is not None and corpus != "stdlib":
            raise ValueError(
                f"data_path={data_path!r} and corpus={corpus!r} both choose the training data; leave data_path "
                f"unset (null) to use the built-in {corpus} corpus, or leave corpus unset to read data_path."
            )
        self.save_hyperparameters()
        builtin = corpus if data_path is None else None
        self.corpus = Corpus.from_paths(data_path, format=format, text_field=text_field, errors=errors, builtin=builtin)
        self.split_spec = SplitSpec(val_fraction, test_fraction, seed)
        self._seq_len = seq_len
        self._tokenizer: Tokenizer | None = None
        self._cache: TokenCache | None = None
        self.datasets: dict[str, TrainWindows | EvalWindows] = {}

    # ------------------------------------------------------------------ cheap properties

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def vocab_size(self) -> int:
        """Known before setup: 257 for bytes, bpe_vocab_size for BPE (guaranteed), else from the file."""
        if self._tokenizer is not None:
            return self._tokenizer.vocab_size
        if self.hparams.tokenizer == "byte":
            return ByteTokenizer.vocab_size
        if self.hparams.tokenizer == "bpe":
            return self.hparams.bpe_vocab_size
        return self.tokenizer.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer; for 'bpe' it is trained on first use (then read from the cache)."""
        if self._tokenizer is None:
            name = self.hparams.tokenizer
            if name == "bpe":
                self._tokenizer = load_or_train_bpe(
                    self.corpus, self.split_spec, self.hparams.bpe_vocab_size, self.hparams.cache_dir
                )
            else:
                self._tokenizer = build_tokenizer(name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use a given tokenizer (e.g. ``load_tokenizer(spec)`` from a checkpoint) instead of building one."""
        self._tokenizer, self._cache = tokenizer, None
        self.datasets.clear()

    @property
    def token_bytes(self) -> torch.Tensor:
        """LongTensor [vocab_size]: UTF-8 bytes per token id (0 for EOS/special); for bits per byte."""
        return torch.from_numpy(self.tokenizer.token_bytes())

    # ------------------------------------------------------------------ Lightning hooks

    def _token_cache(self) -> TokenCache:
        if self._cache is None:
            self._cache = build_token_cache(self.corpus, self.tokenizer, self.split_spec, self.hparams.cache_dir)
            if self._cache.index["max_id"] >= self.vocab_size:
                raise ValueError(
                    f"token cache {self._cache.path} holds id {self._cache.index['max_id']} but the tokenizer's "
                    f"vocab_size is {self.vocab_size}; delete that folder and fix the tokenizer file."
                )
            manifest = self._cache.manifest
            if manifest is not None and manifest.get("corpus") == "site-packages":
                rank_zero_info(f"data: {SitePackagesManifest.from_dict(manifest).summary()} "
                               f"(per package: {self._cache.path / 'manifest.json'})")
            if self._cache.index.get("split_mode") == "tokens":
                v, t = self.hparams.val_fraction, self.hparams.test_fraction
                rank_zero_info(
                    f"data: {self._cache.index.get('n_documents', '?')} documents are too few for document-level "
                    f"splits (val_fraction={v}, test_fraction={t}), so validation and test are carved from token "
                    f"ranges: the last {v + t:.0%} of every document's tokens ({v:.0%} val, then {t:.0%} test)"
                )
        return self._cache

    def prepare_data(self) -> None:
        """Train the BPE (if any) and build the token cache; runs on one process per node."""
        self._token_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and build the datasets needed by `stage`."""
        cache = self._token_cache()
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = self._train_dataset(cache)
        if stage in (None, "fit", "validate") and "val" not in self.datasets and self.hparams.val_fraction > 0:
            self.datasets["val"] = self._eval_dataset(cache, "val", self.hparams.val_samples)
        if stage in (None, "test") and "test" not in self.datasets and self.hparams.test_fraction > 0:
            self.datasets["test"] = self._eval_dataset(cache, "test", None)

    def _train_dataset(self, cache: TokenCache) -> TrainWindows:
        """Training windows; warns about skipped short documents, errors if no window fits."""
        split, T, pack = cache.split("train"), self.seq_len, self.hparams.pack_documents
        train = TrainWindows(split, T, cache.eos_id, pack)
        tokens = int(split.lengths.sum())
        if train.skipped_docs and not pack:
            # a warning only when it matters (>= 1% of the tokens); the stdlib corpus skips ~0.01%
            say = rank_zero_warn if train.skipped_tokens >= 0.01 * max(1, tokens) else rank_zero_info
            say(
                f"{train.skipped_docs} of {len(split.lengths)} training documents are shorter than "
                f"seq_len + 1 = {T + 1} tokens and are skipped ({train.skipped_tokens} tokens, "
                f"{_share(train.skipped_tokens, tokens)} of the training tokens); "
                "use a smaller seq_len or pack_documents=True to train on them."
            )
        if len(train) == 0:
            if pack:
                have, fix = f"the packed training split has {split.n_tokens} tokens", "use a smaller seq_len"
            else:
                longest = int(split.lengths.max()) if len(split.lengths) else 0
                have = f"the longest training document has {longest} tokens"
                fix = "use a smaller seq_len or pack_documents=True"
            raise ValueError(f"no training window of seq_len + 1 = {T + 1} tokens fits: {have}; {fix}.")
        self.train_samples = self.hparams.samples_per_epoch or max(1, tokens // T)
        rank_zero_info(
            f"train: {len(split.names)} documents, {tokens} tokens, {self.train_samples} windows of {T} per epoch"
        )
        return train

    def _eval_dataset(self, cache: TokenCache, name: str, cap: int | None) -> EvalWindows:
        """Evaluation windows scoring every target of the split once (or `cap` of them, evenly spread)."""
        split, T, pack = cache.split(name), self.seq_len, self.hparams.pack_documents
        ds = EvalWindows(split, T, cache.eos_id, pack, cap)
        short = int(((split.lengths >= 2) & (split.lengths < T + 1)).sum())
        note = f"; {short} documents shorter than seq_len + 1 are right-padded" if short and not pack else ""
        rank_zero_info(
            f"{name}: {len(split.names)} documents, {int(split.lengths.sum())} tokens, "
            f"using {len(ds)} of {ds.total_windows} windows{note}"
        )
        return ds

    def _dataset(self, name: str) -> TrainWindows | EvalWindows | None:
        if name not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[name])
        return self.datasets.get(name)

    def _loader_kwargs(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            batch_size=self.hparams.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _shard(self) -> dict:
        """``num_replicas`` and ``rank`` of the data-parallel shard, from the trainer's strategy
        (under sequence parallelism the ranks of one sequence group read the same windows);
        empty without a distributed trainer (the samplers then ask torch.distributed)."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        return {k: kwargs[k] for k in ("num_replicas", "rank")} if kwargs else {}

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        sampler = RandomWindowSampler(ds, self.train_samples, seed=self.hparams.seed, **self._shard())
        loader = ResumableDataLoader(ds, sampler=sampler, **self._loader_kwargs())
        self._fit_val_interval_to_epoch(len(loader))
        return loader

    def _fit_val_interval_to_epoch(self, batches: int) -> None:
        """An integer ``trainer.val_check_interval`` longer than an epoch (a small corpus under a
        recipe's interval) counts training batches across epochs instead of failing in Lightning:
        ``check_val_every_n_epoch`` becomes None, with a note."""
        trainer = getattr(self, "trainer", None)
        interval = getattr(trainer, "val_check_interval", None)
        if (isinstance(interval, bool) or not isinstance(interval, int) or interval <= batches
                or trainer.check_val_every_n_epoch is None):
            return
        trainer.check_val_every_n_epoch = None
        rank_zero_info(
            f"trainer.val_check_interval={interval} is longer than an epoch ({batches} training batches): "
            f"validating every {interval} training batches across epochs (check_val_every_n_epoch=None)"
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation windows; an empty list (no validation) when val_fraction is 0."""
        ds = self._dataset("val")
        return [] if ds is None else DataLoader(ds, sampler=ShardSampler(ds, **self._shard()), **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        ds = self._dataset("test")
        if ds is None:
            raise ValueError("there is no test split: test_fraction is 0; set test_fraction > 0 to test.")
        return DataLoader(ds, sampler=ShardSampler(ds, **self._shard()), **self._loader_kwargs())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Saved in checkpoints: resuming with a different tokenizer is refused by `load_state_dict`."""
        return {"tokenizer_fingerprint": self.tokenizer.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("tokenizer_fingerprint")
        if saved is not None and saved != self.tokenizer.fingerprint():
            raise ValueError(
                f"the checkpoint was trained with tokenizer fingerprint {saved}, but "
                f"tokenizer={self.hparams.tokenizer!r} now gives {self.tokenizer.fingerprint()} "
                "(BPE trained on changed data or settings?); use the checkpoint's tokenizer: pass the path of its "
                "tokenizer.json, or set datamodule.tokenizer = load_tokenizer(spec)."
            )
