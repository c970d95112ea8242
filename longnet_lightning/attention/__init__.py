"""Dilated attention: pattern → plan → data movement → kernel, and the dense reference.

``pattern.py`` (branches, views), ``plan.py`` (which kernel calls, strided / packed / sharded),
``fused.py`` (gathers, merges, gradient accumulation), ``kernels.py`` (torch / sdpa / xformers),
``dilated.py`` (the engine and its exact backward), ``settings.py`` (how it runs),
``reference.py`` (the dense formula), ``multihead.py`` and ``position.py`` (the layer).
"""
from .dilated import DilatedAttention, dilated_attention
from .kernels import BACKENDS, select_kernel, xformers_status
from .pattern import DilationPattern
from .plan import SequenceLayout
from .reference import dilated_attention_reference
from .settings import FALLBACKS, AttentionSettings

__all__ = [
    "BACKENDS", "FALLBACKS", "AttentionSettings", "DilatedAttention", "DilationPattern", "SequenceLayout",
    "dilated_attention", "dilated_attention_reference", "select_kernel", "xformers_status",
]
