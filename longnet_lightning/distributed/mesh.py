"""The data x sequence mesh: which ranks share a sequence, which share a data shard.

With world size ``W`` and ``sequence_parallel_size`` ``P`` (``W % P == 0``), ranks
``[i*P, (i+1)*P)`` form sequence group ``i``: they read the same sequences and each holds one
contiguous chunk of every sequence, in rank order. Ranks with the same position in their sequence
group form a data-parallel group. Data-parallel rank ``i`` (of ``W / P``) decides which sequences a
sequence group reads; the sampler sees only that rank and size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MeshShape:
    """Pure arithmetic of the mesh for one rank (no process groups)."""

    world_size: int
    rank: int
    sequence_parallel_size: int = 1

    def __post_init__(self):
        p, w = self.sequence_parallel_size, self.world_size
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"sequence_parallel_size={p!r}: use a positive integer (1 = no sequence parallelism)")
        if w % p:
            raise ValueError(f"sequence_parallel_size={p} does not divide the world size {w}: use a divisor of "
                             f"{w} ({[d for d in range(1, w + 1) if w % d == 0]})")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.sequence_parallel_size

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_parallel_size

    def sequence_ranks(self, i: int) -> list[int]:
        p = self.sequence_parallel_size
        return list(range(i * p, (i + 1) * p))

    def data_ranks(self, j: int) -> list[int]:
        return list(range(j, self.world_size, self.sequence_parallel_size))


class SequenceMesh:
    """Process groups of the mesh, made once on every rank (``new_group`` is collective).

    ``sequence_group``: this rank's sequence group (``None`` when ``sequence_parallel_size == 1``).
    ``data_group``: this rank's data-parallel group.
    """

    def __init__(self, sequence_parallel_size: int = 1, backend: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError("SequenceMesh needs torch.distributed to be initialised first")
        self.shape = MeshShape(dist.get_world_size(), dist.get_rank(), sequence_parallel_size)
        s = self.shape
        self.sequence_group = self.data_group = None
        for i in range(s.data_parallel_size):  # every rank creates every group, in the same order
            g = dist.new_group(s.sequence_ranks(i), backend=backend)
            if s.data_parallel_rank == i:
                self.sequence_group = g
        for j in range(s.sequence_parallel_size):
            g = dist.new_group(s.data_ranks(j), backend=backend)
            if s.sequence_rank == j:
                self.data_group = g
        if s.sequence_parallel_size == 1:
            self.sequence_group = None

    def __getattr__(self, name):
        return getattr(self.shape, name)


def split_sequence(x: torch.Tensor, size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s contiguous chunk of ``x`` along ``dim`` (``torch.tensor_split``: lengths
    differ by at most one, earlier ranks longer). Every rank needs at least one position."""
    if x.shape[dim] < size:
        raise ValueError(f"a sequence of {x.shape[dim]} positions cannot be split over a sequence group of {size} "
                         f"ranks: use sequences of at least {size} tokens or a smaller sequence_parallel_size")
    return torch.tensor_split(x, size, dim=dim)[rank]
