"""Distribution: sequence parallelism for dilated attention, the data x sequence mesh, and the
Lightning strategy that runs both. The model and the attention math know nothing of it."""
from .sequence import RowExchange, exchange_lengths, gather_lengths

__all__ = ["RowExchange", "exchange_lengths", "gather_lengths"]
