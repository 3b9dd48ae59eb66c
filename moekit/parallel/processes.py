"""Running a function on N local processes joined in a gloo group, for checks and tests.

Processes are forked, not spawned: a forked group starts in a fraction of a second where a
spawned one takes seconds (each re-imports torch). Every process is ended by the call that
started it, within ``timeout`` seconds, whatever happens: a rank that raises makes the call
raise with that rank's message, a rank that hangs is killed.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist


def _to_bytes(value) -> bytes:
    # As bytes: torch's pickling of tensors between processes passes file descriptors, which
    # die with the rank that sent them.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(rank: int, world: int, store_path: str, function, args, results) -> None:
    torch.set_num_threads(1)  # one core per rank, and no OpenMP pool inherited across fork
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        try:
            results.put((rank, True, _to_bytes(function(rank, world, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(function, world: int, *args, timeout: float = 120.0) -> list:
    """``function(rank, world, *args)`` on ``world`` processes in one gloo group; returns what
    each rank returned, in rank order (it must pickle)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store_path = os.path.join(folder, "store")
        processes = [context.Process(target=_rank_main, daemon=True,
                                     args=(rank, world, store_path, function, args, results))
                     for rank in range(world)]
        for process in processes:
            process.start()
        outcomes = {}
        try:
            for _ in range(world):
                rank, ok, value = results.get(timeout=timeout)
                if not ok:
                    raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
                outcomes[rank] = torch.load(io.BytesIO(value), weights_only=False)
        except queue.Empty:
            raise TimeoutError(f"ranks {sorted(set(range(world)) - set(outcomes))} of {world} "
                               f"gave no result within {timeout:g} s") from None
        finally:
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join()
    return [outcomes[rank] for rank in range(world)]
