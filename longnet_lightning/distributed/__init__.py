"""Distribution, one folder: the collectives of sequence-parallel attention (``sequence.py``),
the data x sequence mesh (``mesh.py``) and the Lightning strategy that runs both
(``strategy.py``). The model and the attention math know nothing of how they are distributed."""
from .mesh import MeshShape, SequenceMesh, split_sequence
from .sequence import RowExchange, exchange_lengths, gather_lengths

__all__ = ["MeshShape", "RowExchange", "SequenceMesh", "SequenceParallelStrategy", "exchange_lengths",
           "gather_lengths", "global_mean", "sequence_group_of", "split_batch", "split_sequence"]


def __getattr__(name):  # the strategy imports Lightning: only when asked for
    if name in ("SequenceParallelStrategy", "global_mean", "sequence_group_of", "split_batch"):
        from . import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
