"""Sequence-parallel dilated attention: parity with one process, bytes sent, time and memory.

    torchrun --standalone --nproc_per_node P -m benchmarks.sequence_parallel [--tokens_per_rank 131072 1048576]

Each of the P ranks holds ``tokens_per_rank`` tokens of one sequence (``N = P x tokens_per_rank``),
12 heads of 64, the paper pattern (or ``--pattern small`` for CPU-sized runs), causal. For each size
it reports the forward+backward median time, the elements a rank sends per step (counted at
the exchange itself; at most ``2 H D ceil(w/r)`` per spanning segment and direction, whatever N)
and the peak memory; with ``--check`` it first compares every rank's output and gradients with one process
on the whole sequence (rank 0 gathers the chunks; small sizes only). NCCL on GPUs (one per
rank), gloo on CPU. Rank 0 prints the table. Started without torchrun
(``python -m benchmarks.sequence_parallel``) it says how to launch it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from longnet_lightning import DilationPattern, dilated_attention
from longnet_lightning.model import PATTERNS


def _counting_exchange():
    """Wrap ``all_to_all_single`` to count the elements this rank sends to the others."""
    sent = {"elements": 0, "calls": 0}
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me = dist.get_rank(group)
        sent["elements"] += sum(n for j, n in enumerate(input_split_sizes or []) if j != me)
        sent["calls"] += 1
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    return sent


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens_per_rank", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--pattern", default="paper", choices=sorted(PATTERNS))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp64"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="compare with one process first (small sizes)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("benchmarks.sequence_parallel: launch it with torchrun --nproc_per_node P -m "
                         "benchmarks.sequence_parallel")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    pattern = DilationPattern(*PATTERNS[args.pattern])
    h, d = args.heads, args.head_dim
    sent = _counting_exchange()
    rows = []
    for n_local in args.tokens_per_rank:
        g = torch.Generator(device=device).manual_seed(1234 + rank)
        q, k, v = (torch.randn(1, n_local, h, d, device=device, dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        dout = torch.randn(1, n_local, h, d, device=device, dtype=dtype, generator=g)
        lengths = [n_local] * world
        if args.check:
            err = _check(q, k, v, dout, pattern, lengths, device, dtype)
        times = []
        for i in range(args.reps + 1):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sent["elements"] = sent["calls"] = 0
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            out = dilated_attention(q, k, v, pattern, group=dist.group.WORLD, lengths=lengths)
            torch.autograd.grad(out, (q, k, v), dout)
            _sync(device)
            if i:  # the first call builds plans and caches
                times.append((time.perf_counter() - t0) * 1e3)
        ms = sorted(times)[len(times) // 2]
        elements = torch.tensor([sent["elements"]], dtype=torch.float64, device=device)
        dist.all_reduce(elements, op=dist.ReduceOp.MAX)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if cuda else "-"
        rows.append((n_local, world * n_local, ms, int(elements.item()), sent["calls"], peak,
                     err if args.check else None))
        del q, k, v, dout, out
    if rank == 0:
        print(f"\n{world} ranks, {'NCCL on ' + torch.cuda.get_device_name() if cuda else 'gloo on CPU'}, "
              f"torch {torch.__version__}, pattern {args.pattern} {pattern}, {h} x {d}, {args.dtype}, causal")
        print("| tokens/rank | N | fwd+bwd ms (median) | elements sent per rank and step, fwd + bwd (max) | "
              "exchanges | peak GiB | max rel. err vs 1 proc |")
        print("|---|---|---|---|---|---|---|")
        for n_local, n, ms, el, calls, peak, err in rows:
            e = "-" if err is None else f"{err:.2e}"
            print(f"| {n_local:,} | {n:,} | {ms:.1f} | {el:,} | {calls} | {peak} | {e} |")
    dist.destroy_process_group()
    return 0


def _check(q, k, v, dout, pattern, lengths, device, dtype) -> float:
    """Largest relative error of this rank's output and gradients against one process (rank 0
    computes the whole sequence from the gathered chunks and scatters the answer back)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out = dilated_attention(q, k, v, pattern, group=dist.group.WORLD, lengths=lengths)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    mine = [out.detach(), *grads]
    parts = [[torch.empty_like(t) for _ in range(world)] for t in (q, k, v, dout)]
    for lst, t in zip(parts, (q.detach(), k.detach(), v.detach(), dout)):
        dist.all_gather(lst, t.contiguous())
    fq, fk, fv, fd = (torch.cat(lst, 1) for lst in parts)
    fq, fk, fv = (t.requires_grad_() for t in (fq, fk, fv))
    ref = dilated_attention(fq, fk, fv, pattern)
    ref_g = torch.autograd.grad(ref, (fq, fk, fv), fd)
    a = sum(lengths[:rank])
    sl = slice(a, a + lengths[rank])
    errs = [((x.double() - y[:, sl].double()).norm() / y[:, sl].double().norm()).item()
            for x, y in zip(mine, (ref, *ref_g))]
    e = torch.tensor([max(errs)], dtype=torch.float64, device=device)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return e.item()


if __name__ == "__main__":
    raise SystemExit(main())
