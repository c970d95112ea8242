"""Long-context evaluation: perplexity, mean NLL and bits per byte by context length, loss by position.

- :func:`evaluate_perplexity` scores tokenised documents with one model at one context length
  (see :mod:`.windows` for the protocol) and returns a :class:`ContextResult`.
- :mod:`.report` renders a report dict into ``results.json``, ``table.md``,
  ``loss_by_position.csv`` and ``loss_by_position.png``.
- The command line is ``python -m longnet_lightning evaluate`` (:mod:`longnet_lightning.evaluate`).
"""
from .perplexity import ContextResult, EvaluationError, evaluate_perplexity, max_context_length
from .report import context_label, markdown, write_report
from .windows import bucket_edges, bucketize, context_windows

__all__ = [
    "ContextResult",
    "EvaluationError",
    "bucket_edges",
    "bucketize",
    "context_label",
    "context_windows",
    "evaluate_perplexity",
    "markdown",
    "max_context_length",
    "write_report",
]
