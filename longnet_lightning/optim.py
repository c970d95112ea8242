"""The optimizer's two pure pieces: AdamW parameter groups and the learning-rate schedule."""
from __future__ import annotations

from torch import nn

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def lr_factor(step: int, *, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0, power: float = 1.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, then a polynomial
    decay of power ``power`` from 1 to ``min_ratio`` (= min_lr / lr) reached at ``decay_steps``,
    and ``min_ratio`` after it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices of linear layers decay; biases, norms and embeddings do not.

    Tied weights (the embedding shared with the output matrix) appear once, in the no-decay group.
    """
    no_decay: set[int] = set()
    for m in module.modules():
        if isinstance(m, NO_DECAY_MODULES):
            no_decay.update(id(p) for p in m.parameters(recurse=False))
    decay, keep = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (keep if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


__all__ = ["lr_factor", "weight_decay_groups"]
