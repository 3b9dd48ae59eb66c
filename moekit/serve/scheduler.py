"""Continuous batching: one thread owns the model and decodes every running sequence in one
batched forward per step.

A request waits in a bounded queue (first come, first served) until its KV blocks and batch
rows are free. Its blocks are reserved whole at admission, prompt + max_tokens - 1 positions
per sequence, so a running sequence never runs out of cache and nothing is ever preempted.
Admitted, its prompts go into the next decoding steps' forwards (chunked prefill, as vLLM and
SGLang do it): each step, every running sequence advances one token and up to
``prefill_tokens_per_step`` prompt tokens of the admitted requests ride along, written
straight into their blocks (``ModelRunner.mixed``); a longer prompt goes in over several
steps, each chunk attending to the earlier ones through the paged cache. The forward that
takes a request's last prompt tokens gives its first tokens. A sequence leaves when it ends
(end of text, stop string, max_tokens) and its blocks return to the pool at once; a request
leaves when its client is gone (``Ticket.cancel``) or its deadline passes, prefilled or not.

Why the prompts ride in the decoding step rather than in a forward of their own: the weights,
the routed experts above all, are read once per forward, whatever its tokens. A prompt of the
12-20 tokens of ``benchmarks/serve_load.py`` cost a forward of its own about as much as a
whole decoding step of 16 rows (the tiny preset on a 2-core CPU, eager: 7.1 ms against 6.2;
compiled step 3.9 ms, eager prefill 8.0), and every fourth gap of a stream at 16 clients
waited on one. Folded into the step, its tokens add their attention and their share of the
expert products, not another pass over the weights (docs/inference.md, Continuous batching,
has the figures). The budget bounds what a long prompt adds to each gap of the running
streams. Each step takes one row's chunk (``_prompt_chunk``): its attention runs apart from
the decoding rows' (its own positions and mask over the paged cache), the
feed-forward over both parts' tokens together (``Transformer.run_parts``), so a request's
keys, values and greedy tokens are those of ``moekit.model.generate`` alone, up to float
rounding. ``separate_prefill`` keeps the former engine (each request's prompts left-padded
into a forward of their own, exactly ``generate``'s prefill, one request between two steps),
to compare; no served model needs it.

A seeded sampled request keeps all its rows in the batch until the last one ends, as
``generate`` does, because its random numbers are drawn for the whole group at each step: the
same seed then gives the same text as ``generate`` with that seed. Other rows leave alone.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from moekit.model.generate import sample_next
from moekit.parallel.mesh import CollectiveError
from moekit.serve.metrics import ServeMetrics
from moekit.serve.runner import ModelRunner
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


class Overloaded(Exception):
    """The waiting queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(Exception):
    """A request the server stopped: ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Prompt tokens folded into one decoding step, of all new requests together (vLLM's
# max_num_batched_tokens less the decoding rows): a longer prompt is split into chunks over
# several steps, so that it lengthens each of the running streams' gaps by a bounded amount.
PREFILL_TOKENS_PER_STEP = 64
# With ``separate_prefill``, at most this many requests are admitted between two decoding steps
# (each one prefill): a burst of arrivals then delays the running streams by one prefill per
# token, not by all.
PREFILLS_PER_STEP = 1

_END = object()  # the last item of an outbox once a request has finished well


class _Outbox:
    """What the scheduler thread sends a request's reader: pieces, then _END or a
    RequestFailed. Read by a thread (``get``) or on an event loop (``aget``); filled by
    ``deliver``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.queue = asyncio.Queue() if loop is not None else queue.Queue()

    def get(self):
        return self.queue.get()

    async def aget(self):
        return await self.queue.get()


def deliver(items: list[tuple[_Outbox, object]]) -> None:
    """Put each item into its outbox: at once for a thread's, and for the outboxes read on an
    event loop with one wake-up of that loop for all of them. Each wake-up from another thread
    is a write to the loop's self-pipe and a turn of the loop: one per row and step took 4% of
    the scheduler thread's time at 16 streams over HTTP."""
    by_loop = defaultdict(list)
    for outbox, item in items:
        if outbox.loop is None:
            outbox.queue.put(item)
        else:
            by_loop[outbox.loop].append((outbox.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outbox_queue, item in batch:
        outbox_queue.put_nowait(item)


@dataclass(eq=False)
class _Row:
    """One sequence: a prompt's j-th completion."""
    ticket: Ticket
    index: int
    stream: TextStream
    blocks: list[int]
    prompt: list[int]
    length: int = 0  # positions in the cache: less than the prompt's while it is prefilled
    next_token: int = -1  # -1 until its request's first tokens are sampled
    generated: int = 0
    first_logits_V: torch.Tensor | None = None  # once its prompt is in, until it is sampled

    @property
    def finished(self) -> bool:
        return self.stream.finish is not None

    @property
    def prompt_left(self) -> int:
        """Prompt positions not in the cache yet (before the first token is sampled)."""
        return len(self.prompt) - self.length


_ids = itertools.count()


class Ticket:
    """A request in the scheduler: iterate it (from a thread) or await
    ``ticket.next_piece()`` (on an event loop) to get its pieces; ``cancel()`` when the client
    leaves. A RequestFailed ends the pieces when the server stopped the request."""

    def __init__(self, prompt_ids: list[list[int]], sampling: Sampling,
                 timeout: float | None, loop: asyncio.AbstractEventLoop | None = None):
        self.id = next(_ids)
        self.prompt_ids, self.sampling = prompt_ids, sampling
        self.usage = Usage(prompt_tokens=sum(len(ids) for ids in prompt_ids))
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.rows: list[_Row] = []
        self.cancelled = False
        self.last_token_at: float | None = None
        self.routed_LE: torch.Tensor | None = None  # expert counts, when routing is logged
        self.outbox = _Outbox(loop)
        self.keeps_all_rows = sampling.seed is not None and sampling.temperature > 0
        self.generator: torch.Generator | None = None  # made on the model's device

    def cancel(self) -> None:
        self.cancelled = True  # read by the scheduler thread at its next step

    def __iter__(self):
        while (item := self.outbox.get()) is not _END:
            if isinstance(item, RequestFailed):
                raise item
            yield item

    async def next_piece(self) -> Piece | None:
        """The next piece, or None once the request has finished (on the event loop);
        cancelling the wait loses nothing."""
        item = await self.outbox.aget()
        if isinstance(item, RequestFailed):
            raise item
        return None if item is _END else item

    @property
    def started(self) -> bool:
        """Whether its first tokens are sampled (all rows' at once, as ``generate`` does)."""
        return bool(self.rows) and self.rows[0].next_token >= 0

    def decoding_rows(self) -> list[_Row]:
        if not self.started:
            return []
        return list(self.rows) if self.keeps_all_rows else \
            [row for row in self.rows if not row.finished]

    @property
    def done(self) -> bool:
        return bool(self.rows) and all(row.finished for row in self.rows)


class Scheduler:
    """Owns ``runner`` (the model and its KV block pool) in a thread of its own from
    construction until ``close()``. ``failure``: the error that stopped it, when the processes
    of a split model lost each other (every request then ends with 503; the server exits)."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_batch: int, max_waiting: int,
                 metrics: ServeMetrics, routing_log=None,
                 prefill_tokens_per_step: int = PREFILL_TOKENS_PER_STEP,
                 separate_prefill: bool = False):
        if not isinstance(prefill_tokens_per_step, int) or prefill_tokens_per_step < 1:
            raise ValueError(f"prefill_tokens_per_step={prefill_tokens_per_step!r} is not "
                             "allowed: expected an integer >= 1")
        self.runner, self.tokenizer, self.pool = runner, tokenizer, runner.pool
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.separate_prefill = separate_prefill
        self.failure: CollectiveError | None = None
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.metrics, self.routing_log = metrics, routing_log
        self._condition = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []  # the scheduler thread's alone
        self._outgoing: list[tuple[_Outbox, object]] = []  # delivered after each forward
        self._admitting, self._closing = True, False
        self._thread = threading.Thread(target=self._loop, name="moekit-scheduler",
                                        daemon=True)
        self._thread.start()

    # -- called from any thread --------------------------------------------------------------
    def check_fits(self, prompt_ids: list[list[int]], sampling: Sampling) -> None:
        rows = len(prompt_ids) * sampling.n
        if rows > self.max_batch:
            raise ValueError(f"this request decodes {rows} sequences (prompts x n); the "
                             f"server's batch holds {self.max_batch}")
        blocks = self._blocks_needed(prompt_ids, sampling)
        if blocks > self.pool.num_blocks:
            raise ValueError(f"this request needs {blocks} KV blocks; the server's whole pool "
                             f"is {self.pool.num_blocks}: send fewer or shorter prompts")

    def submit(self, ticket: Ticket) -> None:
        with self._condition:
            if not self._admitting:
                raise RequestFailed(503, "the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                self.metrics.finished("overloaded")
                raise Overloaded(f"the server is busy: {len(self._waiting)} requests are "
                                 "waiting already; try again later", retry_after=1)
            self._waiting.append(ticket)
            self.metrics.queue_length.set(len(self._waiting))
            self._condition.notify()

    def stop_admitting(self) -> None:
        with self._condition:
            self._admitting = False

    @property
    def admitting(self) -> bool:
        return self._admitting

    def idle(self) -> bool:
        with self._condition:
            return not self._waiting and not self._running

    def close(self) -> None:
        """Stop the thread; every request still waiting or running ends with 503."""
        with self._condition:
            self._admitting, self._closing = False, True
            self._condition.notify()
        self._thread.join()

    # -- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._turn():
                pass
        reason = ("the server shut down before this request finished" if self.failure is None
                  else f"a serving process failed: {self.failure}")
        for ticket in [*self._waiting, *self._running]:
            self._end(ticket, RequestFailed(503, reason))
        self._waiting.clear()
        self._deliver()
        if self.failure is None:
            self.runner.close()  # from this thread: a split runner's last collective

    def _turn(self) -> bool:
        with self._condition:
            woken = True
            while woken and not (self._waiting or self._running or self._closing):
                woken = self._condition.wait(self.runner.idle_call_s)
            if self._closing:
                return False
            self._expire_waiting()
            admitted = self._admit()
        self._running.extend(admitted)
        try:
            if not woken:
                self.runner.idle()
            for ticket in admitted:
                self._start(ticket)
                if self.separate_prefill:
                    self._prefill(ticket)
            if any(ticket.decoding_rows() or not ticket.started for ticket in self._running):
                self._step()
            self._retire()
        except CollectiveError as error:  # the model's processes lost each other: stop
            with self._condition:
                self.failure, self._admitting, self._closing = error, False, True
            return False
        except Exception as error:  # a bug here must fail its requests, not the server
            for ticket in list(self._running):
                self._end(ticket, RequestFailed(500, f"the engine failed: {error!r}"))
        self._deliver()
        self.metrics.update_load(len(self._waiting), sum(len(t.decoding_rows())
                                                         for t in self._running),
                                 self.pool.used_blocks)
        return True

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._waiting if t.cancelled or _late(t, now)]:
            self._waiting.remove(ticket)
            self._end(ticket, _failure(ticket))

    def _admit(self) -> list[Ticket]:
        admitted = []
        rows_in_use = sum(len(t.decoding_rows()) for t in self._running)
        free = self.pool.free_blocks
        while self._waiting:
            ticket = self._waiting[0]
            rows = len(ticket.prompt_ids) * ticket.sampling.n
            blocks = self._blocks_needed(ticket.prompt_ids, ticket.sampling)
            if (rows_in_use + rows > self.max_batch or blocks > free
                    or (self.separate_prefill and len(admitted) == PREFILLS_PER_STEP)):
                break  # first come, first served: no one overtakes the head of the queue
            self._waiting.popleft()
            rows_in_use, free = rows_in_use + rows, free - blocks
            admitted.append(ticket)
        return admitted

    def _blocks_needed(self, prompt_ids, sampling: Sampling) -> int:
        # The last token is sampled, never fed back: it needs no cache.
        return sampling.n * sum(self.pool.blocks_for(len(ids) + sampling.max_tokens - 1)
                                for ids in prompt_ids)

    def _start(self, ticket: Ticket) -> None:
        """Give an admitted request its rows (a prompt's n completions) and their blocks."""
        sampling = ticket.sampling
        if ticket.keeps_all_rows:
            ticket.generator = torch.Generator(device=self.pool.keys[0].device).manual_seed(
                sampling.seed)
        prompts = [ids for ids in ticket.prompt_ids for _ in range(sampling.n)]
        for index, ids in enumerate(prompts):
            blocks = self.pool.allocate(
                self.pool.blocks_for(len(ids) + sampling.max_tokens - 1))
            ticket.rows.append(_Row(ticket, index, TextStream(self.tokenizer, sampling.stop),
                                    blocks, ids))  # at once, so that _end frees them

    def _prefill(self, ticket: Ticket) -> None:
        """The request's prompts in a forward of their own (``separate_prefill``)."""
        logits_B1V = self.runner.prefill([row.prompt for row in ticket.rows],
                                         [row.blocks for row in ticket.rows])
        for row in ticket.rows:
            row.length = len(row.prompt)
        self._count_routing([(ticket, sum(len(row.prompt) for row in ticket.rows))])
        [tokens] = self._sample([(ticket, ticket.rows)], logits_B1V[:, -1])
        self._accept(ticket, ticket.rows, tokens)
        self._deliver()  # its first token now, not after the next step

    def _prompt_chunk(self) -> tuple[_Row | None, int]:
        """The prompt tokens that join this step: the next ones of the first row not started
        yet (first come, first served), at most ``prefill_tokens_per_step``; (None, 0) when
        every row has its prompt in. One row a step: each part of a forward runs attention's
        projections and kernels of its own (a second prompt in the step would lengthen this
        gap of every stream by as much again, where the next step can take it), and a
        compiled mixed step has graphs for a one-row chunk (``PagedDecodeStep``)."""
        for ticket in self._running:
            for row in ticket.rows if not ticket.started else ():
                if row.prompt_left:
                    return row, min(row.prompt_left, self.prefill_tokens_per_step)
        return None, 0

    def _step(self) -> None:
        """One forward: every decoding row advances a token, and the next prompt tokens of a
        request not started yet go in with them; once all its prompts are in, that request
        gets its first tokens, sampled with the step's."""
        groups = [(ticket, ticket.decoding_rows()) for ticket in self._running]
        groups = [(ticket, rows) for ticket, rows in groups if rows]
        rows = [row for _, group in groups for row in group]
        decoding = ([row.next_token for row in rows], [row.blocks for row in rows],
                    [row.length for row in rows])
        chunk_row, length = (None, 0) if self.separate_prefill else self._prompt_chunk()
        spans = [(ticket, len(group)) for ticket, group in groups]
        if chunk_row is None:
            logits_BV = self.runner.decode(*decoding)
        else:
            logits_BV = self.runner.mixed(
                *decoding, chunk_row.prompt[chunk_row.length:chunk_row.length + length],
                chunk_row.blocks, chunk_row.length)
            chunk_row.length += length
            if chunk_row.prompt_left == 0:
                chunk_row.first_logits_V = logits_BV[-1]
            spans.append((chunk_row.ticket, length))
        for row in rows:
            row.length += 1
        self._count_routing(spans)
        logits_BV = logits_BV[:len(rows)]
        starting = None if chunk_row is None else chunk_row.ticket
        if starting is not None and all(row.first_logits_V is not None
                                        for row in starting.rows):
            groups.append((starting, starting.rows))
            logits_BV = torch.cat([logits_BV, torch.stack([row.first_logits_V
                                                           for row in starting.rows])])
            for row in starting.rows:
                row.first_logits_V = None
        for (ticket, group), tokens in zip(groups, self._sample(groups, logits_BV)):
            self._accept(ticket, group, tokens)

    @staticmethod
    def _sample(groups, logits_BV: torch.Tensor) -> list[list[int]]:
        """The next token of every row of ``groups`` ((ticket, its rows), in the order of
        the logits' rows), read back to the host once for all: greedy rows by one argmax over
        the whole batch, the rows of unseeded sampled requests with the same settings in one
        draw, a seeded request's rows from its own generator, as ``generate`` draws them (so
        that its seed gives the same text whatever else shares the batch)."""
        tokens_B = logits_BV.argmax(-1)
        spans, start = [], 0
        unseeded = defaultdict(list)  # (temperature, top_p) -> rows of the batch
        for ticket, rows in groups:
            span, start = slice(start, start + len(rows)), start + len(rows)
            spans.append(span)
            sampling = ticket.sampling
            if sampling.temperature == 0:
                continue
            if ticket.generator is None:
                unseeded[sampling.temperature, sampling.top_p].extend(range(span.start,
                                                                            span.stop))
            else:
                tokens_B[span] = sample_next(logits_BV[span], sampling.temperature, None,
                                             sampling.top_p, ticket.generator)
        for (temperature, top_p), rows in unseeded.items():
            rows_R = torch.tensor(rows, device=logits_BV.device)
            tokens_B[rows_R] = sample_next(logits_BV[rows_R], temperature, None, top_p)
        tokens = tokens_B.tolist()
        return [tokens[span] for span in spans]

    def _accept(self, ticket: Ticket, rows: list[_Row], tokens: list[int]) -> None:
        """Take each row's next token and send the text that became final."""
        sampling = ticket.sampling
        now = time.monotonic()
        self.metrics.token_times(ticket.submitted, ticket.last_token_at, now)
        ticket.last_token_at = now
        for row, token in zip(rows, tokens):
            row.next_token = token
            if row.finished:
                continue
            ticket.usage.completion_tokens += 1
            row.generated += 1
            text = row.stream.add(token)
            if not row.finished and row.generated == sampling.max_tokens:
                text += row.stream.close("length")
            if text or row.finished:
                self._send(ticket, Piece(row.index, text, row.stream.finish))
            if row.finished and not ticket.keeps_all_rows:
                self._release(row)

    def _count_routing(self, spans: list[tuple[Ticket, int]]) -> None:
        """Routed tokens per layer and expert of the last forward, into the metrics and,
        when routing is logged, each request's counts (``spans``: (ticket, how many of the
        forward's tokens are its own), in the forward's order of tokens)."""
        counts = self.metrics.count_routing()
        if self.routing_log is None:
            return
        start = 0
        for ticket, tokens in spans:
            span = slice(start, start + tokens)
            routed_LE = torch.stack([expert_ids.bincount(minlength=experts)
                                     for expert_ids, experts in
                                     ((ids_TK[span].flatten(), e) for ids_TK, e in counts)])
            ticket.routed_LE = routed_LE if ticket.routed_LE is None else \
                ticket.routed_LE + routed_LE
            start += tokens

    def _release(self, row: _Row) -> None:
        self.pool.release(row.blocks)
        row.blocks = []

    def _retire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._running if t.done or t.cancelled or _late(t, now)]:
            self._end(ticket, _END if ticket.done else _failure(ticket))

    def _end(self, ticket: Ticket, outcome) -> None:
        """Take the request out, give its blocks back, and tell its reader ``outcome``."""
        if ticket in self._running:
            self._running.remove(ticket)
        for row in ticket.rows:
            if row.blocks:
                self._release(row)
        status = "ok" if outcome is _END else ("cancelled" if ticket.cancelled
                                               else str(outcome.status))
        self.metrics.finished(status, ticket.usage)
        if self.routing_log is not None:
            try:
                self.routing_log.write(ticket, status)
            except OSError as error:  # a full disk stops the log, not the serving
                print(f"moekit serve: the routing log stopped: {error}", file=sys.stderr)
                self.routing_log = None
        self._send(ticket, outcome)

    def _send(self, ticket: Ticket, item) -> None:
        """Queue a Piece, then _END or a RequestFailed, for the ticket's reader."""
        self._outgoing.append((ticket.outbox, item))

    def _deliver(self) -> None:
        items, self._outgoing = self._outgoing, []
        deliver(items)


def _late(ticket: Ticket, now: float) -> bool:
    return ticket.deadline is not None and now > ticket.deadline


def _failure(ticket: Ticket) -> RequestFailed:
    if ticket.cancelled:
        return RequestFailed(499, "the client went away")
    return RequestFailed(504, "the request ran past the server's deadline of "
                              f"{ticket.deadline - ticket.submitted:g} s")
