"""Lightning strategy: data parallelism (DDP) over every rank, LongNet sequence parallelism inside
groups of ``sequence_parallel_size`` consecutive ranks.

    trainer:
      strategy:
        class_path: longnet_lightning.distributed.SequenceParallelStrategy
        init_args: {sequence_parallel_size: 4}

Ranks of one sequence group read the same batches (samplers see only the data-parallel rank and
size, :attr:`distributed_sampler_kwargs`); each keeps its contiguous chunk of every sequence
(:func:`split_batch`) and the attention exchanges only the sparsified K and V rows its spanning
segments need. Gradients are averaged by DDP over all ranks, so a LightningModule that scales its
loss as :func:`global_mean` does gets exactly the gradient of one process on the global batch:
every token's loss counts once over the data x sequence mesh.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from .mesh import SequenceMesh, split_sequence


class SequenceParallelStrategy(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` with a data x sequence mesh.

    Args:
        sequence_parallel_size: ranks that share each sequence (1: plain data parallelism). Must
            divide the world size; the other factor is the data-parallel size.
        **kwargs: anything :class:`DDPStrategy` takes (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "sequence_parallel"

    def __init__(self, sequence_parallel_size: int = 1, **kwargs: Any):
        if isinstance(sequence_parallel_size, bool) or not isinstance(sequence_parallel_size, int) \
                or sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size={sequence_parallel_size!r}: use a positive integer "
                             "(1 = data parallelism only)")
        super().__init__(**kwargs)
        self.sequence_parallel_size = sequence_parallel_size
        self.mesh: SequenceMesh | None = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.mesh = SequenceMesh(self.sequence_parallel_size)

    @property
    def sequence_group(self):
        """This rank's sequence group (``None`` without sequence parallelism)."""
        return None if self.mesh is None else self.mesh.sequence_group

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.mesh is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self.mesh.data_parallel_size, "rank": self.mesh.data_parallel_rank}


def sequence_group_of(trainer) -> Any:
    """The sequence group of ``trainer``'s strategy, or ``None`` (any strategy without one)."""
    return getattr(getattr(trainer, "strategy", None), "sequence_group", None)


def split_batch(batch: dict, group) -> dict:
    """This rank's contiguous chunk (along the sequence) of every ``[B, N]`` tensor of ``batch``."""
    if group is None:
        return batch
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return {k: split_sequence(v, size, rank) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in batch.items()}


def global_mean(nll_sum: torch.Tensor, count: torch.Tensor, tokens: int = 0):
    """``(loss to backpropagate, global mean NLL, global input tokens)`` from this rank's NLL sum,
    scored-token count and input-token count.

    The loss is ``world_size * nll_sum / global count``: DDP's average of the ranks' gradients is
    then the gradient of the global mean, every token counted once over the data x sequence mesh
    (one all-reduce of three scalars; none on one process). The token count is an ``int`` on one
    process, else a float64 tensor on the device: reading it (``.item()``) would make the host wait
    for the GPU in every step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        total = count.clamp(min=1)
        return nll_sum / total, nll_sum.detach() / total, int(tokens)
    sums = torch.stack([nll_sum.detach().to(torch.float64), count.to(torch.float64),
                        torch.tensor(float(tokens), dtype=torch.float64, device=count.device)])
    dist.all_reduce(sums)
    total = sums[1].clamp(min=1)
    return nll_sum * (dist.get_world_size() / total).to(nll_sum.dtype), sums[0] / total, sums[2]
