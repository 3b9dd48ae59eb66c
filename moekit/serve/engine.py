"""The serving engine: text in, text out, one batch at a time.

Requests are checked whole before any work (so a bad one is refused with a message and costs
nothing). A request's prompts (times ``n``) decode together as one batch with a preallocated KV
cache; ``kv_cache_bytes`` caps the cache a request may allocate. Concurrent requests take turns
step by step (a lock around each decoding step: on a CPU one batch already keeps every core
busy); they are not merged into one batch.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from moekit.model import KVCache, Transformer
from moekit.model.generate import stream_tokens
from moekit.serve.text import TextStream


@dataclass
class Sampling:
    max_tokens: int | None = 16  # None: as many as the context and the server's limit allow
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1  # completions per prompt


@dataclass
class Piece:
    """New text of one completion (``index``: prompt * n + j); ``finish_reason`` is set on its
    last piece ("stop": end of text or a stop string, "length": max_tokens)."""
    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    def __init__(self, model: Transformer, tokenizer, name: str, *, max_tokens_limit: int = 1024,
                 max_n: int = 8, kv_cache_bytes: int | None = None,
                 chat_template: str | None = None, aliases: tuple[str, ...] = ()):
        # ``name`` is the one /v1/models lists and responses carry; requests may also use aliases
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.aliases = aliases
        self.max_tokens_limit, self.max_n = max_tokens_limit, max_n
        self.kv_cache_bytes, self.chat_template = kv_cache_bytes, chat_template
        self.lock = threading.Lock()

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

    def complete(self, prompts: list[str], sampling: Sampling
                 ) -> tuple[Iterator[Piece], Usage]:
        """Check the request, then return the pieces of text as they come, and the token
        counts (complete once the pieces are consumed)."""
        prompt_ids = self.encode(prompts)
        self._check(prompt_ids, sampling)
        batch = [ids for ids in prompt_ids for _ in range(sampling.n)]
        steps = stream_tokens(self.model, batch, sampling.max_tokens,
                              temperature=sampling.temperature, top_p=sampling.top_p,
                              eos_id=self.tokenizer.eos_id, seed=sampling.seed)
        usage = Usage(prompt_tokens=sum(len(ids) for ids in prompt_ids))
        return self._pieces(steps, [TextStream(self.tokenizer, sampling.stop) for _ in batch],
                            usage), usage

    def _pieces(self, steps, streams: list[TextStream], usage: Usage) -> Iterator[Piece]:
        while True:
            # The lock is held for one decoding step only, never while a client reads: a
            # client that leaves mid-stream must not keep the model from the others.
            with self.lock:
                step = next(steps, None)
            if step is None:
                break
            for index, (stream, token) in enumerate(zip(streams, step)):
                if token is None or stream.finish:
                    continue
                usage.completion_tokens += 1
                text = stream.add(token)
                if text or stream.finish:
                    yield Piece(index, text, stream.finish)
            if all(stream.finish for stream in streams):
                return
        for index, stream in enumerate(streams):
            if not stream.finish:
                yield Piece(index, stream.close("length"), "length")
