"""Run a function on several CPU processes joined by a ``gloo`` group, under a timeout.

``run_ranks(fn, world, *args)`` spawns ``world`` processes; each sets up ``torch.distributed``
(gloo, a file store), calls ``fn(rank, world, *args)`` and sends back what it returns. A rank that
raises fails the test with its traceback; ranks that have not finished within ``timeout``
seconds are killed and the test fails: a distributed test never hangs.
"""
from __future__ import annotations

import io
import os
import queue
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank, world, store_path, fn, args, results):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        buf = io.BytesIO()  # tensors as bytes: shared-memory handles die with this process
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 180.0):
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, fn, args, results), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        got, errors = {}, []
        try:
            while len(got) + len(errors) < world:
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world)) - set(got))
                    raise AssertionError(f"ranks {missing} did not finish within {timeout:.0f} s (a hang?)") from None
                if status == "ok":
                    got[rank] = torch.load(io.BytesIO(value), weights_only=True)
                else:
                    errors.append((rank, value))
                    break  # the other ranks may be blocked in a collective: do not wait for them
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
        if errors:
            rank, msg = errors[0]
            raise AssertionError(f"rank {rank} failed: {msg}")
        return [got[r] for r in range(world)]
