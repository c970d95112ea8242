"""longnet_lightning: LongNet dilated attention for PyTorch Lightning.

The attention math lives in :mod:`longnet_lightning.attention`, the model in
:mod:`longnet_lightning.model`, the Lightning glue in :mod:`longnet_lightning.lm` and
:mod:`longnet_lightning.cli`, the data in :mod:`longnet_lightning.data`. Names are imported
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
