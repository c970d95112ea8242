"""Long-context evaluation: perplexity, mean NLL and bits per byte by context length, loss by position.

- :func:`evaluate_perplexity` scores tokenised documents with one model at one context length
  (protocol: :func:`longnet_lightning.data.windows.context_windows`) and returns a
  :class:`ContextResult`.
- :mod:`.report` renders a report dict into ``results.json``, ``table.md``,
  ``loss_by_position.csv`` and ``loss_by_position.png``.
- :mod:`.buckets`: the log-spaced position buckets of the loss by position.
- :mod:`.command`: the command line, ``python -m longnet_lightning evaluate`` (its data flags use
  the DataModule's names). The package imports the model, the data and the checkpoint module,
  never the CLI or the LightningModule.
"""
from .perplexity import ContextResult, EvaluationError, evaluate_perplexity, max_context_length
from .report import context_label, markdown, write_report
from ..data.windows import context_windows
from .buckets import bucket_edges, bucketize

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
