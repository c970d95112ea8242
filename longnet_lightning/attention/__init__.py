"""Dilated attention: the pattern and its views, kernels, the merge, and the dense reference."""
from .dilated import DilatedAttention, dilated_attention
from .kernels import BACKENDS, select_kernel, xformers_status
from .pattern import DilationPattern
from .reference import dilated_attention_reference

__all__ = [
    "BACKENDS", "DilatedAttention", "DilationPattern", "dilated_attention",
    "dilated_attention_reference", "select_kernel", "xformers_status",
]
