"""The collectives of sequence-parallel dilated attention, and the checks that keep them exact.

The attention (:mod:`longnet_lightning.attention`) decides which rows travel; this module moves
them. :class:`RowExchange` is one ``all_to_all_single`` over the sequence group: each rank sends
every other rank exactly the selected K and V rows it needs (nothing to ranks that need none),
and the backward runs the same exchange the other way. :func:`exchange_lengths` gathers every
rank's chunk length once and checks that everything else about the call agrees, so a mismatch is
an error on every rank instead of a hang.
"""
from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist


class RowExchange:
    """``exchange(send, send_sizes, recv_sizes) -> recv``: rank ``j`` gets ``send_sizes[j]``
    elements of this rank's flat ``send`` (in rank order), this rank gets ``recv_sizes[i]`` from
    rank ``i``. Counts what it sends (``elements_sent``) for the communication tests."""

    def __init__(self, group):
        self.group = group
        self.elements_sent = 0

    @staticmethod
    def rank(group) -> int:
        return dist.get_rank(group)

    def __call__(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        me = dist.get_rank(self.group)
        self.elements_sent += sum(n for j, n in enumerate(send_sizes) if j != me)
        out = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, send.contiguous(), recv_sizes, send_sizes, group=self.group)
        return out


def gather_lengths(group, n_local: int, device, **agree: int) -> tuple[int, ...]:
    """Every rank's chunk length in rank order (one small all-gather), after checking that the
    integers ``agree`` (batch size, heads, ...) are the same on every rank: a mismatch raises the
    same one-line ``ValueError`` on every rank, so no rank is left waiting in a collective."""
    names = list(agree)
    mine = torch.tensor([int(n_local), *(int(agree[k]) for k in names)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]
    for i, name in enumerate(names, start=1):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = values if not name.endswith("(id)") else ["differs"] * len(values)
            raise ValueError(f"sequence parallelism: the ranks disagree on {name.removesuffix(' (id)')} ({shown} by "
                             "rank); every rank of the group must pass a chunk of the same sequences with the same "
                             "settings")
    return tuple(row[0] for row in rows)


def exchange_lengths(group, q: torch.Tensor, v: torch.Tensor, run) -> tuple[int, ...]:
    """:func:`gather_lengths` for one attention call ``q`` ``[B, N_local, H, D]``: batch, heads,
    head dims, dtype, mask, pattern, scale and kernel must agree across the group."""
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    return gather_lengths(
        group, q.shape[1], q.device, batch=q.shape[0], heads=q.shape[2], **{
            "head dim of q and k": q.shape[3], "head dim of v": v.shape[3], "causal": int(run.causal),
            "dtype (id)": dtypes.index(q.dtype) if q.dtype in dtypes else -1,
            "pattern (id)": zlib.crc32(repr((run.pattern.segment_lengths, run.pattern.dilation_rates)).encode()),
            "scale (id)": struct.unpack("<q", struct.pack("<d", run.scale))[0],
            "kernel (id)": zlib.crc32(run.kernel.name.encode())})
