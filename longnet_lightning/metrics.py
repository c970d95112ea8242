"""Scored-token sums: bits per byte, and torchmetrics ``Metric`` s for validation and test.

Every number counts exactly the *scored* targets (``labels != IGNORE_INDEX``):

- :func:`label_bytes` and :func:`bits_per_byte`: the one definition of bits per byte,
  ``sum NLL (nats) / ln 2 / sum UTF-8 bytes of the scored targets`` (used by these metrics and by
  :mod:`longnet_lightning.evaluation`).
- :class:`TokenNLL`, :class:`TokenPerplexity`, :class:`BitsPerByte`: sums of per-token NLL
  (float64), scored-token counts and byte counts over batches and devices (``sum`` reductions).
"""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from .model import IGNORE_INDEX


def label_bytes(labels: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """int64 scalar: UTF-8 bytes of the scored targets; labels ``[...]``, token_bytes ``[V]`` (bytes per id)."""
    scored = labels != IGNORE_INDEX
    return token_bytes.to(labels.device)[labels[scored]].sum()


def bits_per_byte(nll_sum, n_bytes):
    """``nll_sum / ln 2 / n_bytes``: total NLL in nats over scored targets per UTF-8 byte of them.

    Works on floats and tensors alike; tokens worth 0 bytes (EOS) add NLL but no bytes.
    """
    return nll_sum / math.log(2) / n_bytes


class _ScoredTokens(Metric):
    """Sums over scored targets (``labels != IGNORE_INDEX``): NLL in nats (float64), tokens, and bytes.

    ``update(nll, labels)`` takes the per-token NLL ``[B, T]`` of the model's
    ``loss(..., reduction="none")`` and the labels ``[B, T]``; only the sums are kept, so no
    ``[tokens, vocab]`` tensor is ever needed. All states reduce with ``sum`` across devices.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, token_bytes: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        if token_bytes is not None:
            token_bytes = torch.as_tensor(token_bytes, dtype=torch.int64)
        self.register_buffer("token_bytes", token_bytes, persistent=False)

    def update(self, nll: torch.Tensor, labels: torch.Tensor) -> None:
        if nll.shape != labels.shape:
            raise ValueError(f"nll {tuple(nll.shape)} and labels {tuple(labels.shape)} must have the same shape")
        scored = labels != IGNORE_INDEX
        self.nll_sum += nll.detach()[scored].sum(dtype=torch.float64)
        self.tokens += scored.sum()
        if self.token_bytes is not None:
            self.bytes += label_bytes(labels, self.token_bytes)

    def _mean_nll(self) -> torch.Tensor:
        return self.nll_sum / self.tokens.clamp(min=1)


class TokenNLL(_ScoredTokens):
    """Mean negative log-likelihood (nats per scored token): ``ΣNLL / Σtokens``."""

    def compute(self) -> torch.Tensor:
        return self._mean_nll()


class TokenPerplexity(_ScoredTokens):
    """Perplexity: ``exp(ΣNLL / Σtokens)`` over exactly the scored tokens."""

    def compute(self) -> torch.Tensor:
        return torch.exp(self._mean_nll())


class BitsPerByte(_ScoredTokens):
    """Bits per UTF-8 byte: ``ΣNLL / ln 2 / Σbytes(labels)``; ``token_bytes[V]`` maps ids to bytes.

    Tokens worth 0 bytes (EOS, special tokens) add their NLL but no bytes, so the cost of
    predicting document ends is charged to the text, as in the usual definition.
    """

    def __init__(self, token_bytes: torch.Tensor, **kwargs):
        if token_bytes is None:
            raise ValueError("BitsPerByte needs the tokenizer's token_bytes table (bytes per token id)")
        super().__init__(token_bytes, **kwargs)

    def compute(self) -> torch.Tensor:
        return bits_per_byte(self.nll_sum, self.bytes.clamp(min=1))


__all__ = ["BitsPerByte", "TokenNLL", "TokenPerplexity", "bits_per_byte", "label_bytes"]
