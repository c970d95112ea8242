"""Perplexity, mean NLL and bits per byte of a model at one context length, and its loss by position.

Usable from Python on any tokenised documents::

    from longnet_lightning.evaluation import evaluate_perplexity
    res = evaluate_perplexity(model, [ids_doc1, ids_doc2], context_length=8192,
                              token_bytes=tokenizer.token_bytes())
    res.perplexity, res.mean_nll, res.bits_per_byte, res.tokens, res.buckets()

``model`` is a :class:`~longnet_lightning.model.LongNet` or anything holding one as ``.model``
(a ``LongNetLM``); it is run where its parameters are, in ``eval`` mode, under
``torch.inference_mode``, one batch of windows at a time: the per-token loss comes from
``LongNet.loss(..., reduction="none")``, chunked over the LM head, so no more than one chunk of
logits exists and memory is the model's own activations for ``batch_size x context`` tokens.
See :mod:`longnet_lightning.data.windows` for which tokens each window scores.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import check_tokenizer
from ..data.windows import DOC, LENGTH, SCORED, context_windows
from ..metrics import bits_per_byte, label_bytes
from ..model import IGNORE_INDEX
from .buckets import bucket_edges, bucketize

PRECISIONS = ("auto", "32", "bf16")
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class EvaluationError(ValueError):
    """A problem with the inputs of an evaluation, reported to the user as one line."""


@dataclass
class ContextResult:
    """Sums over exactly the scored targets of one (model, context length, stride) evaluation.

    ``position_nll`` / ``position_count`` (length ``context_length``): NLL sum and number of
    targets at each position (index j = position j + 1 = predicted from j + 1 tokens).
    ``document_nll`` / ``document_tokens`` (one per input document, in input order): NLL sum and
    scored targets of each document, the units that :mod:`.intervals` resamples.
    """

    context_length: int
    stride: int
    documents: int  # documents with at least one target
    short_documents: int  # of those, with fewer than context_length + 1 tokens: one shorter window
    longest_document: int  # tokens
    windows: int
    tokens: int  # scored targets
    nll_sum: float  # nats, summed in float64
    bytes: int | None  # UTF-8 bytes of the scored targets (None without a token_bytes table)
    position_nll: np.ndarray = field(repr=False)
    position_count: np.ndarray = field(repr=False)
    document_nll: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    document_tokens: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood in nats per scored target."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """``exp(mean_nll)`` over exactly the ``tokens`` scored targets."""
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        """``nll_sum / ln 2 / bytes``; None without a token_bytes table."""
        if not self.bytes:
            return None
        return bits_per_byte(self.nll_sum, self.bytes)

    def buckets(self, edges: np.ndarray | None = None, per_octave: int = 1) -> list[dict]:
        """Mean NLL per log-spaced position bucket (see :func:`.buckets.bucketize`)."""
        if edges is None:
            edges = bucket_edges(self.context_length, per_octave)
        return bucketize(self.position_nll, self.position_count, edges)

    def summary(self) -> dict:
        """The scalar results as a JSON-ready dict."""
        return {
            "context_length": self.context_length,
            "stride": self.stride,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll_sum": self.nll_sum,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "documents": self.documents,
            "short_documents": self.short_documents,
            "longest_document": self.longest_document,
            "windows": self.windows,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "document_nll": [float(x) for x in self.document_nll],
            "document_tokens": [int(x) for x in self.document_tokens],
        }


def _network(model: torch.nn.Module) -> torch.nn.Module:
    """The LongNet inside ``model`` (itself, or ``model.model`` for a LongNetLM)."""
    if callable(getattr(model, "loss", None)) and hasattr(model, "config"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and callable(getattr(inner, "loss", None)):
        return inner
    raise EvaluationError(
        f"{type(model).__name__} is neither a LongNet nor holds one as .model (a LongNetLM whose model is built)."
    )


def max_context_length(model: torch.nn.Module) -> tuple[int | None, str]:
    """The longest window the model can take (None: no limit) and why.

    Dense attention with XPOS anchors its decay at the centre of the whole sequence, and the
    decay factors leave float32's range beyond about 70K positions (see ``attention/position.py``);
    dilated attention anchors per block and RoPE has no decay, so neither has a limit.
    """
    try:
        from ..attention.position import _XPOS_MAX_HALF_SPAN, Rotary
    except ImportError:  # the attention code changed: the model's own error is caught at run time instead
        return None, ""
    net = _network(model)
    for module in net.modules():
        if isinstance(module, Rotary) and module.scale_base is not None and module.anchor_block is None:
            return 2 * _XPOS_MAX_HALF_SPAN + 1, "dense attention with XPOS positions"
    return None, ""


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → 'bf16' on a CUDA device that supports it, else '32'."""
    if precision not in PRECISIONS:
        raise EvaluationError(f"precision={precision!r} is not one of {list(PRECISIONS)}.")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"
    return precision


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _as_numpy(doc) -> np.ndarray:
    if isinstance(doc, torch.Tensor):
        doc = doc.detach().cpu().numpy()
    arr = np.asarray(doc)
    if arr.ndim != 1:
        raise EvaluationError(f"each document must be a 1-D sequence of token ids, got shape {arr.shape}.")
    return arr


def evaluate_perplexity(
    model: torch.nn.Module,
    docs: Sequence,
    context_length: int,
    stride: int | None = None,
    *,
    token_bytes=None,
    batch_size: int | None = None,
    batch_tokens: int = 16384,
    precision: str = "auto",
    progress: bool = True,
    desc: str | None = None,
    group=None,
) -> ContextResult:
    """Score every target of ``docs`` once with windows of at most ``context_length`` tokens.

    Args:
        model: a LongNet (or a LongNetLM), already on the device to use.
        docs: token-id sequences (numpy arrays, tensors, lists, memmaps), one per document.
        context_length: tokens per window (c).
        stride: targets scored per window after the first (s, ``1..c``); None = c, i.e.
            non-overlapping windows. A smaller stride gives every scored target at least
            ``c - s`` tokens of context at ``c / s`` times the compute.
        token_bytes: int ``[vocab_size]`` UTF-8 bytes per token id (``Tokenizer.token_bytes()``),
            for bits per byte; None leaves bits per byte out.
        batch_size: windows per forward pass; None = ``max(1, batch_tokens // context_length)``.
        precision: 'auto' (bf16 autocast on CUDA, float32 elsewhere), '32' or 'bf16'.
        progress: show a tqdm bar counting scored targets.
        group: a ``torch.distributed`` group over which every window is split (sequence
            parallelism: each rank holds a contiguous chunk of it, so contexts longer than one
            device holds can be scored). Every rank of the group passes the same ``docs`` and
            gets the same result, equal to one process scoring the whole windows.

    Raises EvaluationError when the model cannot take ``context_length`` tokens (naming the fix)
    or when the inputs are wrong; out of memory names the batch size to lower.
    """
    net = _network(model)
    c = int(context_length)
    if c < 1:
        raise EvaluationError(f"context length {c} must be at least 1 token.")
    s = c if stride is None else int(stride)
    if not 1 <= s <= c:
        raise EvaluationError(f"stride {s} must be between 1 and the context length {c}.")
    limit, why = max_context_length(net)
    if limit is not None and c > limit:
        raise EvaluationError(
            f"context length {c} is more than this model can take: {why} works up to {limit} positions. "
            f"Use context lengths <= {limit} for it (dilated attention or position='rope' have no such limit)."
        )
    if group is not None and c < torch.distributed.get_world_size(group):
        raise EvaluationError(f"context length {c} is shorter than the sequence group "
                              f"({torch.distributed.get_world_size(group)} ranks): every rank needs a position.")
    if batch_size is None:
        batch_size = max(1, int(batch_tokens) // c)
    if batch_size < 1:
        raise EvaluationError(f"batch_size={batch_size} must be at least 1.")
    arrays = [_as_numpy(d) for d in docs]
    lengths = np.asarray([len(a) for a in arrays], dtype=np.int64)
    windows = context_windows(lengths, c, s)
    expected = int(np.maximum(lengths - 1, 0).sum())
    param = next(net.parameters())
    device = param.device
    precision = resolve_precision(precision, device)
    vocab = net.config.vocab_size
    table = None if token_bytes is None else torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
    if table is not None:
        try:
            check_tokenizer(table.numel(), vocab, "token_bytes")
        except ValueError as e:
            raise EvaluationError(str(e)) from None

    pos_nll = torch.zeros(c, dtype=torch.float64, device=device)
    pos_cnt = torch.zeros(c, dtype=torch.int64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    doc_nll = torch.zeros(len(arrays), dtype=torch.float64, device=device)
    doc_cnt = torch.zeros(len(arrays), dtype=torch.int64, device=device)
    # Longest windows first: batches hold windows of (nearly) one length, so little padding.
    order = np.argsort(-windows[:, LENGTH], kind="stable")
    bar = tqdm(total=expected, unit="tok", unit_scale=True, desc=desc or f"context {c}", disable=not progress,
               dynamic_ncols=True)
    was_training = net.training
    net.eval()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), _autocast(precision, device):
            for i in range(0, len(order), batch_size):
                rows = windows[order[i : i + batch_size]]
                L = int(rows[:, LENGTH].max())
                x = np.zeros((len(rows), L), dtype=np.int64)  # right padding: causal, so harmless
                y = np.full((len(rows), L), IGNORE_INDEX, dtype=np.int64)
                for b, (d, start, length, scored) in enumerate(rows.tolist()):
                    tok = arrays[d][start : start + length + 1]
                    x[b, :length] = tok[:-1]
                    y[b, length - scored : length] = tok[length - scored + 1 :]
                xs = torch.from_numpy(x).to(device, non_blocking=True)
                ys = torch.from_numpy(y).to(device, non_blocking=True)
                at = slice(0, L)
                if group is not None:  # this rank's contiguous chunk of every window
                    xs, ys, at = _chunk(xs, ys, group)
                nll = _window_nll(net, xs, ys, c, len(rows), group)
                pos_nll[at] += nll.sum(0, dtype=torch.float64)
                mask = ys != IGNORE_INDEX
                pos_cnt[at] += mask.sum(0)
                d = torch.from_numpy(np.ascontiguousarray(rows[:, DOC])).to(device)
                doc_nll.index_add_(0, d, nll.sum(1, dtype=torch.float64))
                doc_cnt.index_add_(0, d, mask.sum(1))
                if table is not None:
                    n_bytes += label_bytes(ys, table)
                bar.update(int(rows[:, SCORED].sum()))
    finally:
        bar.close()
        net.train(was_training)
    if group is not None:  # every rank scored its chunk of every window: sum them
        for t in (pos_nll, pos_cnt, n_bytes, doc_nll, doc_cnt):
            torch.distributed.all_reduce(t, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    counts = pos_cnt.cpu().numpy()
    tokens = int(counts.sum())
    if tokens != expected:  # the window table and the masks disagree: a bug, never the user's input
        raise RuntimeError(f"scored {tokens} targets, expected {expected}; please report this.")
    nll_pos = pos_nll.cpu().numpy()
    nll_sum = float(nll_pos.sum())
    if not math.isfinite(nll_sum):
        raise EvaluationError(
            f"the loss at context length {c} is not finite ({nll_sum}); try --precision 32 "
            "(bf16 may overflow) and check the checkpoint."
        )
    return ContextResult(
        context_length=c,
        stride=s,
        documents=int((lengths >= 2).sum()),
        short_documents=int(((lengths >= 2) & (lengths < c + 1)).sum()),
        longest_document=int(lengths.max()) if len(lengths) else 0,
        windows=len(windows),
        tokens=tokens,
        nll_sum=nll_sum,
        bytes=int(n_bytes) if table is not None else None,
        position_nll=nll_pos,
        position_count=counts,
        document_nll=doc_nll.cpu().numpy(),
        document_tokens=doc_cnt.cpu().numpy(),
        seconds=seconds,
    )


def _chunk(x: torch.Tensor, y: torch.Tensor, group):
    """This rank's chunk of windows ``x, y`` ``[B, L]`` (right-padded, never scored, to at least
    one position per rank) and the slice of window positions it covers."""
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    if x.shape[1] < size:
        pad = size - x.shape[1]
        x = torch.nn.functional.pad(x, (0, pad))
        y = torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)
    lengths = [len(t) for t in torch.tensor_split(torch.arange(x.shape[1]), size)]
    a = sum(lengths[:rank])
    return x[:, a:a + lengths[rank]], y[:, a:a + lengths[rank]], slice(a, a + lengths[rank])


def _window_nll(net, x: torch.Tensor, y: torch.Tensor, c: int, batch: int, group=None) -> torch.Tensor:
    """Per-token NLL ``[B, L]`` (0 where not scored); model errors become EvaluationError."""
    try:
        if group is not None:
            return net.loss(x, y, reduction="none", group=group).float()
        return net.loss(x, y, reduction="none").float()
    except _OOM:
        raise EvaluationError(
            f"out of memory scoring {batch} window(s) of {c} tokens; lower --batch_size "
            f"(now {batch}) or --batch_tokens, or use a shorter context length."
        ) from None
    except ValueError as e:
        raise EvaluationError(f"evaluating windows of {c} tokens failed: {e}") from None
