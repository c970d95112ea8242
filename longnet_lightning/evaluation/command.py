"""``python -m longnet_lightning evaluate``: how well do checkpoints predict long text, by context length?

The data flags carry the DataModule's names (``--data_path``, ``--seed``, ``--pack_documents``;
the old ``--data``, ``--split_seed`` and ``--pack`` still work as aliases). This module imports
the model and the checkpoint module only: never the CLI or the LightningModule.

Example (a LongNet and its dense baseline, on the held-out test split they were trained on)::

    python -m longnet_lightning evaluate \\
        --ckpt_path runs/longnet/checkpoints/last.ckpt runs/dense/checkpoints/last.ckpt \\
        --names "LongNet 8K" "Transformer 2K" --context_lengths 2K 8K 32K

    python -m longnet_lightning evaluate --ckpt_path model.ckpt --data_path book.txt papers/ more.jsonl \\
        --context_lengths 2048 8192 32768 --stride 1024

    python -m longnet_lightning evaluate --ckpt_path runs/longnet runs/dense --context_lengths 2K 8K 32K \\
        --stride c/2 --patterns trained capped --min_document_tokens 32769 --max_document_tokens 64K
    python -m longnet_lightning evaluate --from_results a/results.json b/results.json --out_dir both

For every checkpoint (and attention pattern, ``--patterns``) and context length: perplexity,
mean NLL and bits per byte over the same scored tokens (protocol in
:mod:`longnet_lightning.data.windows`; with ``--stride``, sliding windows beside the
non-overlapping ones), the mean NLL by position in the window in log-spaced buckets, and the NLL
sum and target count of every document, from which :mod:`.intervals` draws 95% bootstrap
intervals and paired differences (between context lengths of a model, between models).
``--from_results`` combines earlier reports of the same documents into one. Written to ``--out_dir``: ``results.json``,
``table.md`` (rows: models, columns: context lengths), ``loss_by_position.csv`` and
``loss_by_position.png``; the tables are printed at the end.

Interrupted runs continue: each result (one model, pattern, protocol and context length) is
added to ``--out_dir``'s ``cells.jsonl`` as soon as it is finished, and the same command with
``--resume`` takes those instead of recomputing them, when every setting that determines a
result is the same (:class:`Cells`). The report is then the one an uninterrupted run writes.

Data: ``--data_path`` takes files, folders (recursive), globs and JSON Lines (``--text_field``), or
``stdlib`` / ``site-packages`` for a built-in corpus; each checkpoint tokenises it with its own tokenizer. Without
``--data_path`` the data the first checkpoint was trained on is used (its saved data-module settings),
restricted to its held-out test split. ``--split`` picks a split of any data by the data
module's document hash. Bad input (not our checkpoint, a context length the model cannot take,
text too short) is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint as ckpt_format
from .buckets import bucket_edges
from .perplexity import PRECISIONS, EvaluationError, evaluate_perplexity, max_context_length, resolve_precision
from .intervals import add_intervals
from .report import context_label, table, write_report

DEBUG_ENV = "LONGNET_DEBUG"
SPLITS = ("all", "train", "val", "test")
STDLIB = "stdlib"
BUILTIN = ("stdlib", "site-packages")  # the data module's built-in corpora, by their --data_path keyword
# Data-module defaults (LongTextDataModule) for splits of data no checkpoint describes.
DEFAULT_SPLIT = {"val_fraction": 0.05, "test_fraction": 0.05, "seed": 1234}


# ----------------------------------------------------------------------------- arguments


def _length(text: str) -> int:
    """A token count: 8192, 8K / 8k (x1024) or 1M (x1048576)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (examples: 2048, 8K, 1M)")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 2**20}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 token")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _stride(text: str) -> int | str:
    """A stride: a token count (512, 2K) or a fraction of each context length ('c/4')."""
    m = re.fullmatch(r"\s*c\s*/\s*(\d+)\s*", text)
    if m:
        if int(m.group(1)) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: the divisor must be at least 1 (c/1 = non-overlapping)")
        return f"c/{int(m.group(1))}"
    return _length(text)


def stride_for(stride: int | str | None, context: int) -> int | None:
    """The stride in tokens for one context length (``c/k`` → ``max(1, c // k)``)."""
    if isinstance(stride, str):
        return max(1, context // int(stride.split("/")[1]))
    return stride


def _pattern(text: str) -> str:
    """An evaluation-time attention pattern: 'trained', 'capped', 'cap=N' or 'W1,W2,..:R1,R2,..'."""
    text = text.strip()
    if text in ("trained", "capped"):
        return text
    m = re.fullmatch(r"cap=(.+)", text)
    if m:
        return f"cap={_length(m.group(1))}"
    m = re.fullmatch(r"([\dkKmM, ]+):([\d, ]+)", text)
    if m:
        w = [_length(x) for x in m.group(1).split(",") if x.strip()]
        r = [_positive(x) for x in m.group(2).split(",") if x.strip()]
        if len(w) != len(r) or not w:
            raise argparse.ArgumentTypeError(f"{text!r}: give one dilation rate per segment length, e.g. 2K,4K:1,2")
        return ",".join(map(str, w)) + ":" + ",".join(map(str, r))
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a pattern; use trained, capped (segments cut at the training length), cap=8K, "
        "or explicit segments:dilations such as 2K,4K,8K:1,2,4")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line (no usage block), exit status 2."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m longnet_lightning evaluate",
        description="Perplexity, mean NLL and bits per byte of checkpoints at several context lengths, "
        "and the loss by position in the context (table, CSV, PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("models")
    m.add_argument("--ckpt_path", nargs="+", metavar="CKPT",
                   help="one or more LongNetLM checkpoints or run folders (their newest last.ckpt); rows of the table")
    m.add_argument("--from_results", nargs="+", metavar="JSON",
                   help="instead of --ckpt_path: combine the results.json of earlier evaluations of the same documents "
                   "(e.g. one per machine) into one report, with intervals and paired differences across all models")
    m.add_argument("--patterns", nargs="+", type=_pattern, default=["trained"], metavar="PATTERN",
                   help="attention patterns to evaluate dilated models with (one row each; the weights do not depend "
                   "on the pattern): trained; capped (every segment cut at the training length, so no branch runs "
                   "at lengths or distances it never saw); cap=8K; or explicit segments:dilations, e.g. "
                   "2K,4K,8K:1,2,4. Dense models run as trained")
    m.add_argument("--names", nargs="+", metavar="NAME",
                   help="a display name per checkpoint (default: e.g. 'LongNet 8K', 'Transformer 2K')")
    m.add_argument("--tokenizer", metavar="SPEC",
                   help="only for checkpoints that store no tokenizer: 'byte' or a tokenizer.json path")
    d = p.add_argument_group("data")
    d.add_argument("--data_path", "--data", nargs="+", metavar="PATH", dest="data_path",
                   help="files, folders (recursive), globs or .jsonl files; 'stdlib' or 'site-packages' = that "
                   "built-in corpus. "
                   "Default: the data the first checkpoint was trained on, test split")
    d.add_argument("--format", choices=("auto", "text", "jsonl", "parquet", "hf"),
                   help="how to read --data_path (default auto: .jsonl files are JSON Lines, .parquet Parquet, a "
                   "save_to_disk folder a Hugging Face dataset)")
    d.add_argument("--text_field", help="JSON Lines field holding the text (default text)")
    d.add_argument("--errors", choices=("strict", "replace"), help="bytes that are not UTF-8: an error "
                   "(strict, default) or U+FFFD (replace)")
    d.add_argument("--split", choices=SPLITS,
                   help="keep only the documents the data module puts in this split (by a hash of their name); "
                   "default: test without --data_path, all with it")
    d.add_argument("--val_fraction", type=_fraction, help="split setting (default: the checkpoint's, else 0.05)")
    d.add_argument("--test_fraction", type=_fraction, help="split setting (default: the checkpoint's, else 0.05)")
    d.add_argument("--seed", "--split_seed", type=int, dest="seed",
                   help="split setting (default: the checkpoint's, else 1234)")
    d.add_argument("--pack_documents", "--pack", action="store_true", dest="pack_documents",
                   help="join the documents, each followed by EOS, into one sequence (as packed training); "
                   "default: each document alone")
    d.add_argument("--min_document_tokens", type=_length, metavar="N",
                   help="keep only documents of at least N tokens (e.g. the longest context + 1, so every column "
                   "scores full windows); how many are kept is reported")
    d.add_argument("--max_document_tokens", type=_length, metavar="N",
                   help="score only the first N tokens of each document (applied after --min_document_tokens); "
                   "reported")
    d.add_argument("--max_tokens", type=_positive,
                   help="read only the first N tokens of the data (documents in order, the last one cut); "
                   "how many of how many is reported")
    d.add_argument("--cache_dir", help="token cache folder (default: the checkpoint's when its data is used, "
                   "else $LONGNET_CACHE or ~/.cache/longnet_lightning)")
    e = p.add_argument_group("protocol")
    e.add_argument("--context_lengths", nargs="+", type=_length, metavar="C",
                   help="window sizes in tokens, e.g. 2048 8K 32K (default: the checkpoints' training lengths)")
    e.add_argument("--stride", type=_stride,
                   help="also score with sliding windows, reported beside the non-overlapping ones: each window "
                   "after the first scores only its last STRIDE targets, so each of those has at least c - STRIDE "
                   "tokens of context. A token count (at most the shortest context length) or c/K for a K-th of "
                   "each context length, e.g. c/4")
    e.add_argument("--bootstrap_resamples", type=_positive, default=2000,
                   help="bootstrap resamples (over documents) for the intervals and paired differences")
    e.add_argument("--confidence", type=_fraction, default=0.95, help="confidence level of the intervals")
    e.add_argument("--buckets_per_doubling", type=_positive, default=1,
                   help="log-spaced position buckets per doubling of the position (1: 1, 2, 3-4, 5-8, ...)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    r.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU (the NLL is always summed in float64)")
    r.add_argument("--batch_size", type=_positive,
                   help="windows per forward pass (default: batch_tokens // context length, at least 1)")
    r.add_argument("--batch_tokens", type=_positive, default=16384, help="tokens per forward pass for the default "
                   "batch size")
    r.add_argument("--out_dir", help="where to write results.json, table.md, loss_by_position.{csv,png} "
                   "(default eval/<date-time>)")
    r.add_argument("--no_progress", action="store_true", help="no progress bars")
    r.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out_dir: the results it finished (kept in its cells.jsonl) "
                        "are taken, not recomputed, where every setting that determines them is the same")
    return p


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A LongNetLM checkpoint read for evaluation (weights memory-mapped until the model is built)."""

    path: str
    raw: dict
    hparams: dict
    config: Any  # LongNetConfig
    tokenizer: Any  # Tokenizer
    limit: int | None
    limit_reason: str

    @property
    def train_seq_len(self) -> int | None:
        v = self.hparams.get("seq_len")
        return int(v) if v else None

    @property
    def data_settings(self) -> dict | None:
        """The LongTextDataModule settings saved with the checkpoint (None if absent)."""
        dm = self.raw.get("datamodule_hyper_parameters")
        if not isinstance(dm, dict) or "data_path" not in dm:
            return None
        return dict(dm)

    @property
    def longest_segment(self) -> int | None:
        """The longest segment of dilated attention: no attention crosses its boundaries, so no
        token sees further back than this (None for dense attention: the whole window)."""
        if self.config.attention != "dilated" or not self.config.segment_lengths:
            return None
        return int(max(self.config.segment_lengths))

    def context_notes(self, name: str, contexts: list[int]) -> list[str]:
        """What a context longer than the model can attend to (or than it was trained at) measures."""
        out = []
        w, trained = self.longest_segment, self.train_seq_len
        beyond = [n for n in contexts if w is not None and n > w]
        if beyond:
            out.append(f"{name}: context {', '.join(context_label(n) for n in beyond)} exceeds its longest segment "
                       f"{w:,} (segment_lengths {list(self.config.segment_lengths)}): dilated attention never crosses "
                       f"a segment boundary, so no target sees more than {w:,} tokens and these columns measure "
                       f"the same reach as {context_label(w)}")
        longer = [n for n in contexts if trained and n > trained]
        if longer:
            out.append(f"{name}: context {', '.join(context_label(n) for n in longer)} exceeds its training length "
                       f"{trained:,} (seq_len): positions past it were never trained")
        return out

    def default_name(self) -> str:
        kind = "LongNet" if self.config.attention == "dilated" else "Transformer"
        return f"{kind} {context_label(self.train_seq_len)}" if self.train_seq_len else kind

    def info(self) -> dict:
        cfg = self.config
        out = {
            "checkpoint": os.path.abspath(self.path),
            "attention": cfg.attention,
            "position": cfg.position,
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "params": cfg.num_params(),
            "vocab_size": cfg.vocab_size,
            "train_seq_len": self.train_seq_len,
            "global_step": self.raw.get("global_step"),
            "tokens_seen": self.raw.get("tokens_seen"),
            "tokenizer": self.tokenizer.spec().get("kind"),
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
        }
        if cfg.attention == "dilated":
            out["segment_lengths"], out["dilation_rates"] = list(cfg.segment_lengths), list(cfg.dilation_rates)
            out["longest_segment"] = self.longest_segment
        if self.limit is not None:
            out["max_context_length"] = self.limit
        return out

    def build(self, device: torch.device):
        """The LongNet with the checkpoint's weights, on ``device``, in eval mode."""
        try:
            net = ckpt_format.build_model(self.raw, f"ckpt_path={self.path!r}", self.config)
        except ckpt_format.CheckpointError as e:
            raise EvaluationError(str(e)) from None
        return net.to(device).eval()


def read_model_checkpoint(path: str, tokenizer_override: str | None = None) -> Checkpoint:
    """Read and check a LongNetLM checkpoint without building its weights (EvaluationError if unusable)."""
    from ..data.tokenizers import build_tokenizer, load_tokenizer
    from ..model import LongNet

    where = f"ckpt_path={str(path)!r}"
    if os.path.isdir(os.path.expanduser(str(path))):  # a run folder: its newest last.ckpt
        found = ckpt_format.newest_last_checkpoint(path)
        if found is None:
            raise EvaluationError(f"{where}: no last.ckpt found in that folder (looked in last.ckpt, checkpoints/ and "
                                  "lightning_logs/version_*/checkpoints/); give a .ckpt file or a run's root folder.")
        _log(f"{where}: using the newest last.ckpt, {found}")
        path = str(found)
    try:
        raw = ckpt_format.read_checkpoint(path)
        config = ckpt_format.model_config(raw, where)
    except ckpt_format.CheckpointError as e:
        raise EvaluationError(str(e)) from None
    hp = ckpt_format.hyperparameters(raw)
    spec = raw.get("tokenizer_spec")
    if tokenizer_override:
        tokenizer = build_tokenizer(tokenizer_override)
    elif spec:
        tokenizer = load_tokenizer(spec)
    else:
        raise EvaluationError(
            f"{where} stores no tokenizer (it was not trained on a LongTextDataModule); "
            "pass --tokenizer byte or --tokenizer path/to/tokenizer.json (the one it was trained with)."
        )
    try:
        ckpt_format.check_tokenizer(tokenizer.vocab_size, config.vocab_size, f"the model of {where}")
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    with torch.device("meta"):  # the limits of this architecture, without allocating its weights
        limit, why = max_context_length(LongNet(config))
    return Checkpoint(str(path), raw, hp, config, tokenizer, limit, why)


# ----------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """Tokenised documents for one tokenizer, and what they are."""

    docs: list  # 1-D integer arrays (memmap views)
    names: list  # one per document (the data module's document names)
    token_bytes: np.ndarray
    description: str
    documents_available: int
    tokens_available: int
    cap: dict | None  # what --max_tokens cut, or None
    manifest: dict | None = None  # the corpus manifest of the token cache (Corpus.corpus_manifest)
    selection: dict | None = None  # what --min_document_tokens / --max_document_tokens kept, or None

    def select(self, min_tokens: int | None, max_tokens: int | None) -> None:
        """Keep documents of at least ``min_tokens`` tokens, then score only the first ``max_tokens`` of each."""
        if min_tokens is None and max_tokens is None:
            return
        before = (len(self.docs), int(sum(len(d) for d in self.docs)))
        keep = [i for i, d in enumerate(self.docs) if min_tokens is None or len(d) >= min_tokens]
        if not keep:
            longest = max((len(d) for d in self.docs), default=0)
            raise EvaluationError(f"--min_document_tokens {min_tokens}: no document is that long (the longest has "
                                  f"{longest:,} tokens; {self.description}); lower it or give longer documents.")
        cut = sum(1 for i in keep if max_tokens is not None and len(self.docs[i]) > max_tokens)
        self.docs = [self.docs[i][:max_tokens] if max_tokens else self.docs[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        self.selection = {"min_document_tokens": min_tokens, "max_document_tokens": max_tokens,
                          "documents_before": before[0], "tokens_before": before[1], "documents": len(self.docs),
                          "tokens": int(sum(len(d) for d in self.docs)), "documents_cut": cut}
        what = []
        if min_tokens is not None:
            what.append(f"documents of at least {min_tokens:,} tokens")
        if max_tokens is not None:
            what.append(f"the first {max_tokens:,} tokens of each ({cut} cut)")
        self.description += (f"; scoring {' and '.join(what)}: {len(self.docs)} of {before[0]} documents, "
                             f"{self.selection['tokens']:,} of {before[1]:,} tokens")


def data_source(args: argparse.Namespace, first: Checkpoint) -> dict:
    """Paths, reading settings and split to evaluate on, from the arguments or the first checkpoint."""
    saved = first.data_settings
    if args.data_path is None:
        if saved is None:
            raise EvaluationError(
                f"no --data_path given and ckpt_path={first.path!r} stores no data-module settings to take it from; "
                "give --data_path with files, folders, globs or .jsonl files (or 'stdlib' / 'site-packages' for a "
                "built-in corpus)."
            )
        paths = saved.get("data_path")
        corpus = (saved.get("corpus") or STDLIB) if paths is None else None
        origin = "the data the first checkpoint was trained on"
        split = args.split or "test"
    else:
        builtin = len(args.data_path) == 1 and args.data_path[0] in BUILTIN
        paths = None if builtin else list(args.data_path)
        corpus = args.data_path[0] if builtin else None
        origin = None
        split = args.split or "all"
    base = saved if (saved is not None and (args.data_path is None or args.split)) else {}
    fractions = {
        "val_fraction": args.val_fraction if args.val_fraction is not None else base.get("val_fraction", 0.05),
        "test_fraction": args.test_fraction if args.test_fraction is not None else base.get("test_fraction", 0.05),
        "seed": args.seed if args.seed is not None else base.get("seed", 1234),
    }
    reading = saved if args.data_path is None else {}
    if (args.data_path is not None and split == "all" and saved is not None
            and _same_data(paths, corpus, saved.get("data_path"), saved.get("corpus"))):
        _log("note: --data_path is the data the first checkpoint was trained on, and --split all keeps its training "
             "documents too; use --split test (or leave out --data_path) to score only its held-out documents")
    return {
        "paths": paths,
        "corpus": corpus,
        "format": args.format or reading.get("format", "auto"),
        "text_field": args.text_field or reading.get("text_field", "text"),
        "errors": args.errors or reading.get("errors", "strict"),
        "split": split,
        "origin": origin,
        "cache_dir": args.cache_dir or reading.get("cache_dir"),  # the training run's token cache, if any
        **fractions,
    }


def _same_data(paths_a, corpus_a, paths_b, corpus_b) -> bool:
    """Whether two (data_path, corpus) settings name the same inputs (data_path None = the built-in
    corpus named by corpus, 'stdlib' when unset)."""
    norm = lambda p, c: (c or STDLIB) if p is None else sorted(  # noqa: E731
        os.path.abspath(os.path.expanduser(x)) for x in ([p] if isinstance(p, str) else p))
    return norm(paths_a, corpus_a) == norm(paths_b, corpus_b)


def _describe_paths(paths, corpus: str | None = None) -> str:
    if paths is None:
        return "the site-packages corpus" if corpus == "site-packages" else "the Python standard library corpus"
    paths = [paths] if isinstance(paths, str) else list(paths)
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return shown


def load_documents(source: dict, tokenizer, pack: bool, max_tokens: int | None, cache_dir: str | None) -> EvalData:
    """Tokenise (through the token cache) and pick the split's documents; apply --pack_documents and --max_tokens."""
    from ..data.cache import Corpus, SplitSpec, build_token_cache

    builtin = (source.get("corpus") or STDLIB) if source["paths"] is None else None
    corpus = Corpus.from_paths(source["paths"], format=source["format"], text_field=source["text_field"],
                               errors=source["errors"], builtin=builtin)
    if source["split"] == "all":
        spec, split_name = SplitSpec(0.0, 0.0, source["seed"]), "train"
        which = "all documents"
    else:
        spec = SplitSpec(source["val_fraction"], source["test_fraction"], source["seed"])
        split_name = source["split"]
        frac = 1 - spec.val_fraction - spec.test_fraction if split_name == "train" else getattr(spec, f"{split_name}_fraction")
        if frac == 0:
            raise EvaluationError(f"--split {split_name}: its fraction is 0, so it holds no document; "
                                  f"set --{split_name}_fraction or use --split all.")
        which = (f"the {split_name} split ({frac:.0%} of documents by a hash of their names, seed {spec.seed}, "
                 f"val_fraction {spec.val_fraction}, test_fraction {spec.test_fraction})")
    cache = build_token_cache(corpus, tokenizer, spec, cache_dir)
    split = cache.split(split_name)
    tokens = split.tokens()
    if pack:
        docs, names = ([tokens], ["<packed>"]) if split.n_tokens else ([], [])
    else:
        docs = [tokens[o:o + n] for o, n in zip(split.offsets.tolist(), split.lengths.tolist())]
        names = [str(x) for x in split.names]
    n_docs, n_tokens = len(split.names), int(sum(len(d) for d in docs))
    longest = max((len(d) for d in docs), default=0)
    cap = None
    if max_tokens is not None and n_tokens > max_tokens:
        kept, left = [], max_tokens
        for d in docs:
            if left <= 0:
                break
            kept.append(d[:left])
            left -= len(kept[-1])
        names = names[:len(kept)]
        cap = {"max_tokens": max_tokens, "tokens_used": int(sum(len(d) for d in kept)),
               "tokens_available": n_tokens, "documents_used": len(kept), "documents_available": len(docs)}
        docs = kept
    origin = source.get("origin")
    what = _describe_paths(source["paths"], builtin)
    desc = f"{which} of {what}" + (f" ({origin})" if origin else "")
    desc += f": {n_docs} documents, {n_tokens:,} tokens" + (" joined with EOS into one sequence" if pack else "")
    if not pack:
        desc += f" (longest {longest:,})"
    return EvalData(docs, names, tokenizer.token_bytes(), desc, n_docs, n_tokens, cap, manifest=cache.manifest)


def check_lengths(data: EvalData, contexts: list[int], pack: bool) -> None:
    """EvaluationError when no document can fill even the shortest window."""
    lengths = [len(d) for d in data.docs]
    longest = max(lengths, default=0)
    shortest = min(contexts)
    if longest < 2:
        raise EvaluationError(f"the data holds no document of 2 or more tokens ({data.description}): nothing to score.")
    if longest < shortest + 1:
        fixes = [f"use --context_lengths of at most {longest - 1}", "give longer text"]
        if data.cap:
            fixes.append(f"raise --max_tokens (now {data.cap['max_tokens']})")
        if not pack and sum(lengths) >= shortest + 1:
            fixes.append("or --pack_documents to join the documents into one sequence")
        raise EvaluationError(
            f"the text is shorter than the shortest context length {shortest}: the longest document has "
            f"{longest} tokens, so no window of {shortest} tokens can be filled ({data.description}); "
            + ", ".join(fixes) + "."
        )


# ----------------------------------------------------------------------------- patterns


@dataclass
class Variant:
    """One row of the report: a checkpoint run with one attention pattern."""

    name: str
    pattern: str  # 'trained', 'capped at 8K', 'explicit' or 'dense'
    config: Any  # the LongNetConfig that runs


def pattern_variants(ckpt: Checkpoint, name: str, patterns: list[str]) -> tuple[list[Variant], list[str]]:
    """The rows for one checkpoint (one per pattern; a dense model has one) and notes on what was skipped."""
    import dataclasses

    cfg = ckpt.config
    if cfg.attention != "dilated":
        skipped = [p for p in patterns if p != "trained"]
        note = [f"{name}: dense attention has no pattern; {', '.join(skipped)} not applied"] if skipped else []
        return [Variant(name, "dense", cfg)], note
    rows, seen, notes = [], {}, []
    for p in patterns:
        w, r = list(cfg.segment_lengths), list(cfg.dilation_rates)
        if p == "trained":
            label, row_name = "trained", name
        elif p == "capped" or p.startswith("cap="):
            cap = ckpt.train_seq_len if p == "capped" else int(p.split("=")[1])
            if cap is None:
                raise EvaluationError(f"--patterns capped: {ckpt.path} stores no training length (seq_len); "
                                      "give cap=N instead.")
            w = [min(x, cap) for x in w]
            label = f"capped at {context_label(cap)}"
            row_name = f"{name}, {label}"
        else:
            ws, rs = p.split(":")
            w, r = [int(x) for x in ws.split(",")], [int(x) for x in rs.split(",")]
            label = "explicit"
            row_name = f"{name}, w {ws} r {rs}"
        key = (tuple(w), tuple(r))
        if key in seen:
            notes.append(f"{row_name}: the same pattern as {seen[key]}; evaluated once")
            continue
        try:
            config = dataclasses.replace(cfg, segment_lengths=w, dilation_rates=r)
        except ValueError as e:
            raise EvaluationError(f"--patterns {p}: {e}") from None
        seen[key] = row_name
        rows.append(Variant(row_name, label, config))
    return rows, notes


def effective_pattern(config, n: int) -> tuple | None:
    """The branches that run on a window of ``n`` tokens (segments cut to it); None for dense."""
    if config.attention != "dilated":
        return None
    return tuple((min(w, n), r) for w, r in zip(config.segment_lengths, config.dilation_rates))


# ----------------------------------------------------------------------------- protocol text


def protocol_description(stride: int | str | None, pack: bool) -> str:
    seq = "the packed sequence" if pack else "each document (windows never cross documents)"
    targets = ("every token but the first is a target" if pack else
               "every token but a document's first is a target")
    if stride is None:
        how = (f"non-overlapping windows of c tokens (c = the column's context length) over {seq}; "
               "a target is predicted from the tokens before it in its window (1 to c of them); "
               "the last window is aligned to the end and scores only targets not scored yet")
    else:
        s = str(stride)  # a token count, or c/k
        how = (f"non-overlapping windows of c tokens (c = the column's context length) over {seq}, the last one "
               "aligned to the end, scoring only targets not scored yet; and, reported beside them, sliding "
               f"windows of c tokens moving {s} tokens at a time: the first window scores all its targets, each "
               f"later one only its last {s}, so every later target has at least c - {s} tokens of context")
    return (f"{targets}, scored exactly once at every context length, so every column averages the same "
            f"targets; {how}. A document with fewer than c + 1 tokens is one shorter window (counted below). "
            "Perplexity = exp(mean NLL); bits per byte = total NLL / ln 2 / UTF-8 bytes of the scored targets. "
            "Loss by position: mean NLL of the targets predicted from p tokens of context, p in log-spaced buckets.")


# ----------------------------------------------------------------------------- resuming


CELLS = "cells.jsonl"


def data_signature(data: EvalData) -> str:
    """A hash of exactly what is scored: every document's name and token ids, in order."""
    h = hashlib.blake2b(digest_size=16)
    for name, doc in zip(data.names, data.docs):
        arr = np.ascontiguousarray(doc)
        h.update(f"{name}\0{arr.dtype}\0{len(arr)}\0".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def cell_key(ckpt: Checkpoint, config, data_sig: str, protocol: str, context: int, stride: int | None,
             edges: np.ndarray, args: argparse.Namespace, device: torch.device, group) -> str:
    """Everything that determines one result, as one string: the checkpoint file (path, size,
    modification time), the model's settings (its pattern included), the scored tokens and the
    tokenizer, the protocol, the loss-by-position buckets, the precision, the device kind, the
    batching and the number of ranks."""
    import torch.distributed as dist

    from .. import __version__

    st = os.stat(ckpt.path)
    return json.dumps({
        "checkpoint": [os.path.abspath(ckpt.path), st.st_size, st.st_mtime_ns],
        "config": config.to_dict(), "tokenizer": ckpt.tokenizer.fingerprint(), "data": data_sig,
        "protocol": protocol, "context": context, "stride": stride, "buckets": [int(e) for e in edges],
        "precision": resolve_precision(args.precision, device), "device": device.type,
        "batch": [args.batch_size, args.batch_tokens], "ranks": dist.get_world_size(group) if group else 1,
        "version": __version__,
    }, sort_keys=True, default=str)


class Cells:
    """The results an evaluation has finished, one JSON line each in ``<out_dir>/cells.jsonl``.

    A fresh run starts the file empty; with ``resume`` the lines already there are read (a last
    line cut short by the interruption is skipped, and said). Only the first rank reads and
    writes; under a sequence group it tells the others, result by result, what it found, so all
    ranks skip or compute the same results.
    """

    def __init__(self, out_dir: Path | None, resume: bool, group=None):
        self.path = None if out_dir is None else Path(out_dir) / CELLS
        self.group, self.done = group, {}
        if self.path is None or not _is_main():
            return
        if not resume:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
            return
        if not self.path.exists():
            _log(f"resume: {self.path} does not exist yet: nothing finished to take, evaluating everything")
            return
        bad = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                self.done[row["key"]] = row["result"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
        _log(f"resume: {len(self.done)} finished result(s) in {self.path}"
             + (f"; {bad} unreadable line(s) skipped (a write cut short), their results are computed again"
                if bad else ""))

    def get(self, key: str) -> dict | None:
        """The stored result for ``key`` (the first rank's answer, on every rank), or None."""
        found = self.done.get(key)
        if self.group is not None:
            import torch.distributed as dist

            box = [found]
            dist.broadcast_object_list(box, src=0, group=self.group)
            found = box[0]
        return found

    def add(self, key: str, result: dict) -> None:
        """Keep a finished result: one line, flushed to disk before the next result starts."""
        self.done[key] = result
        if self.path is None or not _is_main():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- main


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EvaluationError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError(f"--device {spec} but no CUDA GPU is visible; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvaluationError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
    return device


def _names(args: argparse.Namespace, ckpts: list[Checkpoint]) -> list[str]:
    if args.names is not None:
        if len(args.names) != len(ckpts):
            raise EvaluationError(f"--names gives {len(args.names)} names for {len(ckpts)} checkpoints; give one each.")
        if len(set(args.names)) != len(args.names):
            raise EvaluationError(f"--names {args.names} repeats a name; give each checkpoint its own.")
        return list(args.names)
    names, seen = [], {}
    for c in ckpts:
        base = c.default_name()
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return names


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sequence_group(device: torch.device):
    """Under ``torchrun`` (``WORLD_SIZE > 1``): every rank in one sequence group, so each window
    is split over all of them (contexts longer than one device holds), and this rank's device
    (``cuda:LOCAL_RANK`` on GPUs). Else ``(None, device)``."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.group.WORLD, device


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def run(args: argparse.Namespace, argv: list[str], out_dir: Path | None = None) -> dict:
    """Evaluate; returns the report dict (main writes it to ``out_dir``, where each finished result
    is also kept as it finishes, for ``--resume``)."""
    if args.from_results:
        if args.ckpt_path:
            raise EvaluationError("give --ckpt_path or --from_results, not both.")
        return combine_reports([Path(p) for p in args.from_results], argv, args.bootstrap_resamples, args.confidence)
    if not args.ckpt_path:
        raise EvaluationError("give --ckpt_path (checkpoints to evaluate) or --from_results (reports to combine).")
    if not 0 < args.confidence < 1:
        raise EvaluationError(f"--confidence {args.confidence} must be between 0 and 1, e.g. 0.95.")
    group, device = sequence_group(_device(args.device))
    ckpts = [read_model_checkpoint(p, args.tokenizer) for p in args.ckpt_path]
    names = _names(args, ckpts)
    contexts = args.context_lengths
    if contexts is None:
        contexts = sorted({c.train_seq_len for c in ckpts if c.train_seq_len})
        if not contexts:
            raise EvaluationError("the checkpoints store no training length; give --context_lengths, e.g. 2048 8192.")
    contexts = sorted(set(contexts))
    if isinstance(args.stride, int) and args.stride > contexts[0]:
        raise EvaluationError(
            f"--stride {args.stride} is longer than the context length {contexts[0]}; "
            f"use a stride of at most {contexts[0]}, a fraction such as c/4, or drop --stride."
        )
    for name, c in zip(names, ckpts):  # every model must take every context length, checked before any work
        too_long = [n for n in contexts if c.limit is not None and n > c.limit]
        if too_long:
            raise EvaluationError(
                f"{name} ({c.path}) cannot take context length(s) {too_long}: {c.limit_reason} works up to "
                f"{c.limit} positions; use --context_lengths of at most {c.limit} for it."
            )
    variants, pattern_notes = [], []
    for name, c in zip(names, ckpts):
        rows, notes = pattern_variants(c, name, args.patterns)
        variants.append(rows)
        pattern_notes += notes
    source = data_source(args, ckpts[0])
    data_by_tokenizer: dict[str, EvalData] = {}
    for c in ckpts:
        fp = c.tokenizer.fingerprint()
        if fp not in data_by_tokenizer:
            try:
                data = load_documents(source, c.tokenizer, args.pack_documents, args.max_tokens, source["cache_dir"])
            except EvaluationError:
                raise
            except (FileNotFoundError, ValueError) as e:  # the data module's messages name the problem and fix
                where = "--data_path" if args.data_path is not None else f"the training data stored in {ckpts[0].path}"
                raise EvaluationError(f"{where}: {e}") from e
            data.select(args.min_document_tokens, args.max_document_tokens)
            check_lengths(data, contexts, args.pack_documents)
            data_by_tokenizer[fp] = data
    first = data_by_tokenizer[ckpts[0].tokenizer.fingerprint()]
    _log(f"data: {first.description}")
    if first.cap:
        cap = first.cap
        _log(f"--max_tokens {cap['max_tokens']:,}: reading {cap['tokens_used']:,} of {cap['tokens_available']:,} "
             f"tokens ({cap['documents_used']} of {cap['documents_available']} documents, the last one cut)")
    lengths = np.asarray([len(d) for d in first.docs])
    for n in contexts:
        short = int(((lengths >= 2) & (lengths < n + 1)).sum())
        if short:
            _log(f"context {context_label(n)}: {short} of {int((lengths >= 2).sum())} documents have fewer than "
                 f"{n + 1:,} tokens; each is scored as one shorter window")
    if len(data_by_tokenizer) > 1:
        _log("note: the checkpoints use different tokenizers; compare them by bits per byte, not perplexity")
    trained_configs = [c.config for c in ckpts]
    context_notes = {}
    for c, rows in zip(ckpts, variants):
        for row in rows:
            c.config = row.config
            context_notes[row.name] = c.context_notes(row.name, contexts)
    for line in [*pattern_notes, *(x for lines in context_notes.values() for x in lines)]:
        _log(f"note: {line}")
    protocols = [("non-overlapping", None)] + ([("sliding", args.stride)] if args.stride is not None else [])

    edges = bucket_edges(max(contexts), args.buckets_per_doubling)
    cells = Cells(out_dir, args.resume, group)
    signatures = {fp: data_signature(d) for fp, d in data_by_tokenizer.items()}
    models = []
    for name, c, rows in zip(names, ckpts, variants):
        data = data_by_tokenizer[c.tokenizer.fingerprint()]
        done: dict[tuple, dict] = {}  # (protocol, context, effective pattern) -> result, shared across rows
        for row in rows:
            c.config = row.config
            net = None  # built for the first result not taken from an interrupted run
            results = []
            for protocol, stride in protocols:
                for n in contexts:
                    key = (protocol, n, effective_pattern(row.config, n))
                    if key in done:  # the same branches run at this length: the same numbers
                        results.append({**done[key], "pattern": row.pattern, "same_as": done[key]["row"]})
                        continue
                    s = stride_for(stride, n)
                    ckey = cell_key(c, row.config, signatures[c.tokenizer.fingerprint()], protocol, n, s, edges,
                                    args, device, group)
                    cell, earlier = cells.get(ckey), " (finished by the interrupted run)"
                    if cell is None:
                        net = net or c.build(device)
                        res = evaluate_perplexity(
                            net, data.docs, n, s, token_bytes=data.token_bytes, batch_size=args.batch_size,
                            batch_tokens=args.batch_tokens, precision=args.precision,
                            progress=not args.no_progress and _is_main(),
                            desc=f"{row.name} @ {context_label(n)}" + (f" stride {s}" if s else ""), group=group,
                        )
                        cell, earlier = {**res.summary(), "protocol": protocol, "buckets": res.buckets(edges)}, ""
                        cells.add(ckey, cell)
                    bpb = f"  bits/byte {cell['bits_per_byte']:.4f}" if cell["bits_per_byte"] is not None else ""
                    _log(f"{row.name} @ {context_label(n)} {protocol}: perplexity {cell['perplexity']:.4f}  mean NLL "
                         f"{cell['mean_nll']:.4f}{bpb}  ({cell['tokens']:,} targets, {cell['windows']:,} windows, "
                         f"{cell['seconds']:.1f} s){earlier}")
                    done[key] = {**cell, "row": row.name}
                    results.append({**done[key], "pattern": row.pattern})
            info = c.info()
            trained = trained_configs[ckpts.index(c)]
            models.append({"name": row.name, **info, "pattern": row.pattern,
                           "trained_pattern": None if trained.attention != "dilated" else
                           {"segment_lengths": list(trained.segment_lengths),
                            "dilation_rates": list(trained.dilation_rates)},
                           "precision": _precision_used(args.precision, device), "cap": data.cap,
                           "context_notes": context_notes[row.name], "results": results})
            del net
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        c.raw = {k: v for k, v in c.raw.items() if k != "state_dict"}  # drop the mapped weights
    report = {
        "command": "python -m longnet_lightning evaluate " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "protocol": {
            "description": protocol_description(args.stride, args.pack_documents),
            "stride": args.stride,
            "protocols": [p for p, _ in protocols],
            "pack_documents": args.pack_documents,
            "position": "tokens of context the target is predicted from, 1..context_length",
            "bucket_upper_edges": edges.tolist(),
        },
        "data": {
            "description": first.description,
            "paths": source["paths"],
            "corpus": source["corpus"],
            "split": source["split"],
            "split_settings": {k: source[k] for k in ("val_fraction", "test_fraction", "seed")},
            "documents": first.documents_available,
            "tokens": first.tokens_available,
            "max_tokens": args.max_tokens,
            "selection": first.selection,
            "scored_documents": {"names": first.names, "tokens": [int(len(d)) for d in first.docs]},
            "manifest": first.manifest,
        },
        "context_lengths": contexts,
        "notes": pattern_notes,
        "models": models,
    }
    return add_intervals(report, args.bootstrap_resamples, args.confidence)


def combine_reports(paths: list[Path], argv: list[str], resamples: int, confidence: float) -> dict:
    """One report from the results.json of several evaluations of the same documents."""
    reports = []
    for p in paths:
        try:
            reports.append(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise EvaluationError(f"--from_results {str(p)!r} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvaluationError(f"--from_results {str(p)!r} is not a results.json ({e}).") from None
        if not isinstance(reports[-1], dict) or "models" not in reports[-1]:
            raise EvaluationError(f"--from_results {str(p)!r} is not a results.json of evaluate (no 'models').")
    base = reports[0]
    docs = base["data"].get("scored_documents")
    for p, r in zip(paths[1:], reports[1:]):
        other = r["data"].get("scored_documents")
        if docs is None or other != docs:
            raise EvaluationError(
                f"--from_results: {p} scored other documents than {paths[0]} (names or token counts differ); "
                "combine only evaluations of the same documents (same data, split and document selection).")
        if r["protocol"].get("stride") != base["protocol"].get("stride") or \
                r["protocol"]["pack_documents"] != base["protocol"]["pack_documents"]:
            raise EvaluationError(f"--from_results: {p} used another protocol (--stride / --pack_documents) than "
                                  f"{paths[0]}; evaluate both the same way.")
    models = [m for r in reports for m in r["models"]]
    names = [m["name"] for m in models]
    if len(set(names)) != len(names):
        raise EvaluationError(f"--from_results: model names repeat ({names}); evaluate with distinct --names.")
    report = {**base, "command": "python -m longnet_lightning evaluate " + shlex.join(argv),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "models": models,
              "context_lengths": sorted({c for r in reports for c in r["context_lengths"]}),
              "combined_from": [{"path": str(p), "command": r.get("command"), "device": r.get("device"),
                                 "created": r.get("created")} for p, r in zip(paths, reports)],
              "notes": [n for r in reports for n in r.get("notes", [])]}
    return add_intervals(report, resamples, confidence)


def _precision_used(precision: str, device: torch.device) -> str:
    return resolve_precision(precision, device)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m longnet_lightning evaluate``; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        out_dir = Path(args.out_dir or Path("eval") / time.strftime("%Y%m%d-%H%M%S"))
        if out_dir.exists() and not out_dir.is_dir():
            raise EvaluationError(f"--out_dir {str(out_dir)!r} is a file; give a folder.")
        if args.resume and args.out_dir is None:
            raise EvaluationError("--resume continues the run in --out_dir; give the --out_dir of the interrupted run.")
        report = run(args, argv, out_dir)
        if not _is_main():  # ranks of a sequence group computed the same report: one writes it
            return 0
        paths = write_report(report, out_dir)
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        msg = str(e).strip() or type(e).__name__
        hint = "" if isinstance(e, EvaluationError) else f"  (set {DEBUG_ENV}=1 for the traceback)"
        print(f"error: {msg}{hint}", file=sys.stderr)
        return 2
    from .report import PROTOCOL_TITLES, comparison_tables, protocols

    for protocol in protocols(report):
        print()
        print(f"Perplexity, {PROTOCOL_TITLES.get(protocol, protocol)}"
              + (f" ({report['intervals']['confidence']:.0%} interval):" if report.get("intervals") else ":"))
        print(table(report, "perplexity", 3, protocol, intervals=bool(report.get("intervals"))))
        comp = comparison_tables(report, protocol)
        if comp:
            print()
            print("Perplexity change (paired, percent; * = interval excludes 0):")
            print("\n".join(comp).rstrip())
        if any(r.get("bits_per_byte") is not None for m in report["models"] for r in m["results"]):
            print()
            print("Bits per byte:")
            print(table(report, "bits_per_byte", 4, protocol))
    print()
    for key in ("table", "csv", "png", "json"):
        print(f"wrote {paths[key]}")
    return 0


__all__ = ["Cells", "build_parser", "main", "read_model_checkpoint", "run"]


if __name__ == "__main__":
    sys.exit(main())
