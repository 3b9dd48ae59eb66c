"""The serving engine: text in, text out, requests batched continuously.

Requests are checked whole before any work (so a bad one is refused with a message and costs
nothing), then handed to the ``Scheduler``, whose thread owns the model and decodes all running
requests together (``moekit/serve/scheduler.py``). Memory for the KV cache comes from one pool of
``kv_cache_memory`` bytes for all requests; ``kv_cache_bytes`` caps what one request may take.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import torch

from moekit.devices import free_memory_bytes
from moekit.model import KVCache, Transformer
from moekit.model.decode_step import PagedDecodeStep
from moekit.model.paged import KVBlockPool
from moekit.serve.metrics import RoutingLog, ServeMetrics
from moekit.serve.runner import ModelRunner
from moekit.serve.scheduler import (PREFILL_TOKENS_PER_STEP, Overloaded, Piece, RequestFailed,
                                    Sampling, Scheduler, Ticket, Usage)

__all__ = ["Engine", "Overloaded", "Piece", "RequestFailed", "Sampling", "Usage",
           "default_kv_cache_memory"]

KV_FREE_SHARE = 0.9  # of the free memory, as vLLM's default gpu_memory_utilization


def default_kv_cache_memory(model: Transformer, max_batch: int) -> int:
    """The planner's rule for the KV cache: what the device has free once the weights are in
    memory (``moekit.plan.inference``: device memory minus weights), here measured, less a
    tenth for the runtime; but no more than ``max_batch`` sequences of the full context use."""
    weight = model.norm.weight
    full_batch = KVCache.bytes_needed(model.config, max_batch, model.config.max_seq_len,
                                      weight.dtype)
    return min(full_batch, int(free_memory_bytes(weight.device) * KV_FREE_SHARE))


class Engine:
    """``complete`` (from a thread) or ``submit`` (on an event loop) requests; ``close()`` stops
    the scheduler thread. Limits: ``max_tokens_limit`` and ``max_n`` per request,
    ``kv_cache_bytes`` of cache per request, ``kv_cache_memory`` bytes of cache for all (in
    blocks of ``block_size`` positions), ``max_batch`` sequences decoding at once,
    ``max_waiting`` requests queued (more: ``Overloaded``), ``request_timeout`` seconds from
    arrival to the last token; ``routing_log``: a file path for the per-request routing log;
    ``runner``: makes the scheduler's forwards from the model and the pool (a split model's
    runs them on all its processes, ``moekit/serve/split.py``); ``compile``: the decoding step
    compiled with torch.compile's ``compile_backend`` (``PagedDecodeStep``), its graphs made
    here, before any request (``compile_seconds`` says how long it took); ``threads``: torch's
    intra-op threads, set for the whole process before the step is made (inductor's kernels keep
    the count they were compiled for; None leaves torch's); ``prefill_tokens_per_step``: the
    new requests' prompt tokens folded into one decoding step (longer prompts go in chunks
    over several steps); ``separate_prefill``: each request's prompts in a forward of their
    own instead, one request between two steps (``moekit/serve/scheduler.py`` says why not
    by default)."""

    def __init__(self, model: Transformer, tokenizer, name: str, *, max_tokens_limit: int = 1024,
                 max_n: int = 8, kv_cache_bytes: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16, max_batch: int = 32,
                 max_waiting: int = 64, request_timeout: float | None = None,
                 routing_log=None, chat_template: str | None = None,
                 aliases: tuple[str, ...] = (), runner=ModelRunner, compile: bool = False,
                 compile_backend: str = "inductor", threads: int | None = None,
                 prefill_tokens_per_step: int = PREFILL_TOKENS_PER_STEP,
                 separate_prefill: bool = False):
        # ``name`` is the one /v1/models lists and responses carry; requests may also use aliases
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.aliases = aliases
        self.max_tokens_limit, self.max_n = max_tokens_limit, max_n
        self.kv_cache_bytes, self.chat_template = kv_cache_bytes, chat_template
        self.request_timeout = request_timeout
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads={threads} is not allowed: expected 1 or more")
            torch.set_num_threads(threads)
        weight = model.norm.weight
        if kv_cache_memory is None:
            kv_cache_memory = default_kv_cache_memory(model, max_batch)
        block_bytes = KVBlockPool.bytes_per_block(model.config, block_size, weight.dtype)
        if kv_cache_memory < block_bytes:
            raise ValueError(f"a KV cache of {kv_cache_memory:,} bytes holds no block of "
                             f"{block_size} positions ({block_bytes:,} bytes)")
        self.pool = KVBlockPool(model.config, kv_cache_memory // block_bytes, block_size,
                                weight.device, weight.dtype)
        self.metrics = ServeMetrics(model)
        self.metrics.kv_blocks_total.set(self.pool.num_blocks)
        self.routing_log = (None if routing_log is None
                            else RoutingLog(routing_log, self.metrics.moe_layers))
        step = PagedDecodeStep(model, compile, compile_backend)
        self.compile_seconds = step.prepare(self.pool, max_batch, mixed=not separate_prefill)
        self.scheduler = Scheduler(runner(model, self.pool, step=step), tokenizer,
                                   max_batch=max_batch, max_waiting=max_waiting,
                                   metrics=self.metrics, routing_log=self.routing_log,
                                   prefill_tokens_per_step=prefill_tokens_per_step,
                                   separate_prefill=separate_prefill)

    def _check(self, prompt_ids: list[list[int]], sampling: Sampling) -> None:
        context = self.model.config.max_seq_len
        longest = max(len(ids) for ids in prompt_ids)
        if sampling.max_tokens is None:
            sampling.max_tokens = max(min(self.max_tokens_limit, context - longest), 1)
        if not 1 <= sampling.max_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_tokens={sampling.max_tokens} is not allowed: this server "
                             f"gives 1 to {self.max_tokens_limit}")
        if not 1 <= sampling.n <= self.max_n:
            raise ValueError(f"n={sampling.n} is not allowed: this server gives 1 to "
                             f"{self.max_n}")
        if longest + sampling.max_tokens > context:
            raise ValueError(f"the prompt ({longest} tokens) + max_tokens "
                             f"({sampling.max_tokens}) exceeds the model context ({context})")
        needed = KVCache.bytes_needed(self.model.config, len(prompt_ids) * sampling.n,
                                      longest + sampling.max_tokens, self.model.norm.weight.dtype)
        if self.kv_cache_bytes is not None and needed > self.kv_cache_bytes:
            raise ValueError(f"this request needs {needed:,} bytes of KV cache; the server's "
                             f"budget is {self.kv_cache_bytes:,}: send fewer or shorter prompts")

    def encode(self, prompts: list[str]) -> list[list[int]]:
        prompt_ids = self.tokenizer.encode_batch(prompts)
        if any(not ids for ids in prompt_ids):
            raise ValueError("prompt must not be empty")
        return prompt_ids

    def submit(self, prompts: list[str], sampling: Sampling,
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Check the request and queue it; read its pieces from the ticket (with
        ``await ticket.next_piece()`` when ``loop`` is given). Raises ValueError for a bad request,
        Overloaded when the queue is full, RequestFailed once the server is shutting down."""
        prompt_ids = self.encode(prompts)
        self._check(prompt_ids, sampling)
        self.scheduler.check_fits(prompt_ids, sampling)
        ticket = Ticket(prompt_ids, sampling, self.request_timeout, loop)
        self.scheduler.submit(ticket)
        return ticket

    def complete(self, prompts: list[str], sampling: Sampling
                 ) -> tuple[Iterator[Piece], Usage]:
        """Check the request, then return the pieces of text as they come, and the token
        counts (complete once the pieces are consumed). Closing the iterator early cancels
        the request."""
        ticket = self.submit(prompts, sampling)

        def pieces():
            try:
                yield from ticket
            finally:
                ticket.cancel()  # a no-op once it has finished
        return pieces(), ticket.usage

    def close(self) -> None:
        """Stop the scheduler: what still runs or waits ends with RequestFailed (503)."""
        self.scheduler.close()
        self.metrics.close()
        if self.routing_log is not None:
            self.routing_log.close()
