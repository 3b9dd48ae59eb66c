"""Serving a model split over several processes: ``torchrun --nproc-per-node N -m moekit serve
--split auto ...``, or ``moekit serve --split auto --nproc N``.

Every process loads the checkpoint and keeps its share of the non-uniform split
(``moekit.parallel.serving_split``: experts and key/value heads in proportion to the device
memory each process has free, measured and exchanged at start). Rank 0 holds the HTTP front
end, the scheduler and the bookkeeping of the KV blocks; the other ranks follow. Before each of
the scheduler's forwards (``ModelRunner``: a decoding step over given rows, with or without
prompt chunks, or a prefill into given blocks) rank 0 broadcasts the call with its arguments,
and every rank makes it, the split model's all-reduces joining them. Each rank's pool has the
same blocks (rank 0 sends their number), each holding that rank's key/value heads. While idle, rank 0 sends a keep-alive every
half collective timeout, so that the followers' wait for the next call never times out.

A process that dies or stalls makes the next collective fail: at once when its connection
closes, after ``--collective-timeout`` seconds when it is silent. Rank 0's scheduler then ends
every request with 503, the server stops, and the command exits 1. Followers stop when rank 0
says so (its shutdown) or is gone; they ignore SIGINT and SIGTERM, so that rank 0 drains its
requests first.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from moekit.devices import free_memory_bytes
from moekit.model import Transformer
from moekit.model.paged import KVBlockPool
from moekit.parallel import plan_split, split_model
from moekit.parallel.mesh import collective
from moekit.serve.runner import ModelRunner

STOP, IDLE = "stop", "idle"


def split_across_processes(model: Transformer, device: str | torch.device) -> Transformer:
    """Keep this rank's share of the split planned from every rank's free memory (in place);
    called by all ranks of the default group together."""
    free = [None] * dist.get_world_size()
    with collective("serving: exchanging free memory"):
        dist.all_gather_object(free, free_memory_bytes(torch.device(device)))
    return split_model(model, plan_split(model, free), dist.get_rank())


def _broadcast(call: tuple | None) -> tuple:
    message = [call]
    with collective("serving: the next call from rank 0"):
        dist.broadcast_object_list(message, src=0)
    return message[0]


class LeaderRunner(ModelRunner):
    """Rank 0's runner: each call is broadcast to the followers, then made with them."""

    def __init__(self, model, pool: KVBlockPool, collective_timeout: float, step=None):
        super().__init__(model, pool, step)
        self.idle_call_s = collective_timeout / 2
        _broadcast(("pool", pool.num_blocks, pool.block_size))

    def prefill(self, prompts, row_blocks):
        _broadcast(("prefill", prompts, row_blocks))
        with collective("serving: prefill"):
            return super().prefill(prompts, row_blocks)

    def decode(self, tokens, tables, lengths):
        _broadcast(("decode", tokens, tables, lengths))
        with collective("serving: decoding step"):
            return super().decode(tokens, tables, lengths)

    def mixed(self, tokens, tables, lengths, chunk, chunk_table, chunk_cached):
        _broadcast(("mixed", tokens, tables, lengths, chunk, chunk_table, chunk_cached))
        with collective("serving: decoding step with a prompt chunk"):
            return super().mixed(tokens, tables, lengths, chunk, chunk_table, chunk_cached)

    def idle(self) -> None:
        _broadcast((IDLE,))

    def close(self) -> None:
        _broadcast((STOP,))


def follow(model: Transformer) -> None:
    """A follower's life: make rank 0's calls on this rank's part of ``model`` until it says
    stop (a collective error when it is gone)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    kind, num_blocks, block_size = _broadcast(None)
    weight = model.norm.weight
    runner = ModelRunner(model, KVBlockPool(model.config, num_blocks, block_size,
                                            weight.device, weight.dtype))
    with torch.inference_mode():
        while (call := _broadcast(None))[0] != STOP:
            if call[0] != IDLE:
                with collective(f"serving: {call[0]}"):
                    getattr(runner, call[0])(*call[1:])
