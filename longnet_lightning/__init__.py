"""longnet_lightning: LongNet dilated attention for PyTorch Lightning.

The attention math lives in :mod:`longnet_lightning.attention`, the model in
:mod:`longnet_lightning.model`, the checkpoint format in :mod:`longnet_lightning.checkpoint`, the
LightningModule in :mod:`longnet_lightning.lm` (its metrics, optimizer pieces and callbacks in
:mod:`.metrics`, :mod:`.optim`, :mod:`.callbacks`), the command line in
:mod:`longnet_lightning.cli`, the data in :mod:`longnet_lightning.data` and long-context
evaluation in :mod:`longnet_lightning.evaluation`. Names are imported
lazily, so ``import longnet_lightning`` stays light and never imports xformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "dilated_attention": "attention",
    "dilated_attention_reference": "attention",
    "DilatedAttention": "attention",
    "DilationPattern": "attention",
    "AttentionSettings": "attention",
    "MultiheadDilatedAttention": "attention.multihead",
    "dense_attention": "attention.multihead",
    "LongNetConfig": "model",
    "LongNet": "model",
    "PRESETS": "model",
    "PATTERNS": "model",
    "LongNetLM": "lm",
    "LongTextDataModule": "data",
    "PromptDataModule": "data",
    "load_model": "checkpoint",
    "evaluate_perplexity": "evaluation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longnet_lightning' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
