"""Decoding steps that ``torch.compile`` traces once: over a fixed-size cache, or a paged one.

``KVCache`` hands attention the positions filled so far (``keys[:, :, :length]``), one more at
every step: a new shape each token, which a compiled step would have to retrace. A
``StaticDecodeCache`` takes over a ``KVCache`` after prefill and always hands attention the
whole preallocated buffer, the positions not yet written (and the left padding) masked out.
The position it writes next is a tensor, not a Python number, so nothing the compiled code
reads changes between steps but tensor values: the same graph serves every step of a
generation, and every generation of the same batch size and cache length.

``DecodeStep`` runs that step, eagerly or compiled (``compile=True``). Eager, it gives the
tokens of recomputing each sequence whole (tested); compiled, inductor fuses the norms, RoPE,
the activations and the small-batch experts' gathers, and the step runs without Python between
its kernels (one graph, the grouped matmul of fp32 experts in it as an operator of ours,
``moekit.moe.experts.opaque_grouped_mm``). The first step of a new batch size or cache length
pays the compilation (minutes on a 2-core CPU the first time, seconds from inductor's on-disk
cache); ``DecodeStep.prepare`` pays it ahead, on scratch buffers, so that a server or a
benchmark pays it once at start, not in a request. Cache lengths are rounded up to a multiple
of ``CACHE_LENGTH_STEP`` so that prompts of different lengths share a graph.

``PagedDecodeStep`` is the serving engine's step over the paged KV cache
(``moekit.model.paged``), whose batch size and block-table width change from step to step:
compiled, those sizes are symbolic in its graphs, so that a few graphs made at start serve
every step.

Shapes: B rows, G key/value heads, P cache positions (the buffer's whole length), Dh head dim,
V vocabulary.
"""
from __future__ import annotations

import functools
import time

import torch

from moekit.model.paged import KVBlockPool, PagedBatch
from moekit.model.transformer import KVCache, Transformer

# Cache lengths are multiples of this (up to the model's context): one compiled graph serves
# every generation whose prompt + new tokens round up to the same length.
CACHE_LENGTH_STEP = 128


def cache_length(needed: int, max_seq_len: int) -> int:
    """``needed`` positions rounded up to a multiple of CACHE_LENGTH_STEP, within the context."""
    return min(-(-needed // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP, max_seq_len)


class StaticDecodeCache:
    """One new position per row and step, at the same slot for every row (rows are
    left-padded together). A cache for ``Transformer.forward`` (the four methods of its
    docstring) that only takes single-token steps."""

    def __init__(self, cache: KVCache, next_position_B: torch.Tensor):
        self.keys, self.values, self.valid_BP = cache.keys, cache.values, cache.valid_BP
        self.max_len = cache.max_len
        device = cache.valid_BP.device
        self.slot_1 = torch.tensor([cache.length], device=device)
        self.position_B1 = next_position_B.to(device).view(-1, 1).clone()
        self.key_P = torch.arange(self.max_len, device=device)
        if device.type == "cuda":
            # A CUDA graph replays over fixed addresses: the tensors the step writes in place
            # stay where they are for the whole generation. Unguarded, so that the next
            # generation's cache re-records the graph instead of recompiling the step.
            for tensor in (*self.keys, *self.values, self.valid_BP, self.slot_1,
                           self.position_B1, self.key_P):
                torch._dynamo.mark_static_address(tensor, guard=False)

    def check_room(self, seq: int) -> None:
        if seq != 1:
            raise ValueError(f"a static decoding cache takes one token per row, not {seq}")
        # The room itself is the caller's to check once, before the steps: reading the slot
        # here would wait for the device.

    def positions_and_mask(self, mask_BS, batch: int, seq: int, device, window=None):
        if mask_BS is not None:
            raise ValueError("a static decoding step takes no padding mask")
        self.valid_BP.index_fill_(1, self.slot_1, True)
        allowed_BP = self.valid_BP
        if window is not None:  # the last ``window`` slots, counted by index as KVCache does
            allowed_BP = allowed_BP & (self.key_P > self.slot_1 - window)
        return self.position_B1, allowed_BP[:, None, None, :]

    def store(self, group: int, k_BG1D: torch.Tensor, v_BG1D: torch.Tensor):
        self.keys[group].index_copy_(2, self.slot_1, k_BG1D)
        self.values[group].index_copy_(2, self.slot_1, v_BG1D)
        return self.keys[group], self.values[group]

    def advance(self, seq: int) -> None:
        self.slot_1 += seq
        self.position_B1 += seq


def _step_logits(model: Transformer, ids_B1: torch.Tensor,
                 cache: StaticDecodeCache) -> torch.Tensor:
    return model(ids_B1, cache=cache).logits[:, -1]


def _paged_step_logits(model: Transformer, ids_B1: torch.Tensor,
                       batch: PagedBatch) -> torch.Tensor:
    # The same step, as a function of its own: torch.compile keeps the graphs it makes (and
    # its limit on their number) per function.
    return _step_logits(model, ids_B1, batch)


def _paged_mixed_logits(model: Transformer,
                        parts: list[tuple[torch.Tensor, PagedBatch]]) -> torch.Tensor:
    hidden = model.run_parts(parts)
    return model.head(torch.cat([x_BSD[:, -1:] for x_BSD in hidden]))[:, -1]


@functools.cache
def _compiled(step_logits, backend: str, dynamic: bool, mode: str | None = None):
    # Made on first use: importing moekit does not load the compiler.
    return torch.compile(step_logits, dynamic=dynamic, backend=backend, mode=mode)


@functools.cache
def _compiled_static(backend: str, device_type: str):
    if backend == "inductor" and device_type == "cuda":
        return _compiled(_step_logits, backend, dynamic=False, mode="reduce-overhead")
    if backend == "inductor" and device_type == "cpu":
        # Its kernels called from C++, as for the paged step below: 3% off the step at 16
        # rows, 16% off the bf16 one at 1 row (benchmarks/decode_step.py; docs/inference.md).
        return torch.compile(_step_logits, dynamic=False, options={"cpp_wrapper": True})
    return _compiled(_step_logits, backend, dynamic=False)


@functools.cache
def _compiled_paged(step_logits, backend: str):
    if backend != "inductor":
        return _compiled(step_logits, backend, dynamic=True)
    # Its kernels called from C++, not from Python: the step's hundred-odd kernels are small,
    # and Python's calls between them cost the compiled forward at 16 rows about a sixth
    # (benchmarks/serve_step.py --compile, tiny preset: 3.5 ms before, 2.9-3.1 ms after), for
    # seconds more compilation per graph.
    return torch.compile(step_logits, dynamic=True, options={"cpp_wrapper": True})


# The prompt chunk of the mixed steps that ``PagedDecodeStep.prepare`` compiles: its length is
# symbolic in their graphs, so that any chunk of 3 or more positions uses them (at 2 or fewer
# with no decoding rows, the MoE layers' small-batch path would take another graph).
PREPARED_CHUNK_POSITIONS = 8


class DecodeStep:
    """``step(ids_B1, cache) -> logits_BV``: one token per row through ``model`` over a
    ``StaticDecodeCache``, compiled when ``compile`` is True, with torch.compile's
    ``backend`` ("inductor" generates fused kernels; "aot_eager" only traces, in seconds,
    which checks that the step traces as one graph without paying for code generation)."""

    def __init__(self, model: Transformer, compile: bool = False, backend: str = "inductor"):
        self.model, self.compile = model, compile
        # On a GPU the compiled step is replayed as a CUDA graph (inductor's "reduce-overhead"):
        # one launch for the step's hundreds of small kernels.
        device_type = next(model.parameters()).device.type
        self.cuda_graphs = compile and backend == "inductor" and device_type == "cuda"
        # Static shapes: a new batch size or cache length compiles a graph of its own rather
        # than a slower dynamic one.
        self._run = _compiled_static(backend, device_type) if compile else _step_logits

    def __call__(self, ids_B1: torch.Tensor, cache: StaticDecodeCache) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._run(self.model, ids_B1, cache)
        # Each call is a step of its own, and its logits are copied out of the graph's
        # output buffer, which the next replay overwrites.
        torch.compiler.cudagraph_mark_step_begin()
        return self._run(self.model, ids_B1, cache).clone()

    @torch.inference_mode()
    def prepare(self, batch_size: int, cache_len: int) -> float:
        """Run one step on scratch buffers of this shape, so that the graph of this batch size
        and (rounded) cache length is compiled before any request needs it; return the
        seconds it took (0.0 when not compiled)."""
        if not self.compile:
            return 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            start = time.perf_counter()
            length = cache_length(cache_len, self.model.config.max_seq_len)
            scratch = self.model.new_cache(batch_size, length)
            scratch.advance(1)  # one position already written, as after a prefill
            scratch.valid_BP[:, 0] = True
            device = scratch.valid_BP.device
            ids_B1 = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self(ids_B1, StaticDecodeCache(scratch, torch.ones(batch_size, dtype=torch.long)))
            return time.perf_counter() - start
        finally:
            self.model.train(was_training)


class PagedDecodeStep:
    """``step(ids_B1, batch) -> logits_BV``: one token per row through ``model`` over a
    ``PagedBatch``, eagerly or compiled (``compile=True``, with torch.compile's ``backend`` as
    for ``DecodeStep``). Compiled, the batch size and the width of the block tables are
    symbolic in the graph, so that the three graphs ``prepare`` makes serve every batch a
    server decodes: one row (torch specialises a size of 1; tables are at least two blocks
    wide for the same reason, ``PagedBatch``), two rows (at top-2, the MoE layers' small-batch
    path, ``moekit.moe.layer``), and three or more. Scalars that the statistics read (Skywork's
    adaptive coefficient) are traced too, where they would otherwise break the graph at every
    MoE layer.

    ``step.mixed(parts) -> logits``: the decoding rows and a prompt chunk in one forward
    (``Transformer.run_parts``; parts: the decoding rows' [B, 1] ids and batch, when there
    are any, then the chunk's [R, L]), the logits of each row's last position. Compiled, the
    rows, the chunk's length and the tables' widths are symbolic: ``prepare`` makes the
    graphs of a one-row chunk after no, one, and two or more decoding rows. A mixed step that
    none of them serves (a chunk of several rows, of one position, or of two with no
    decoding rows) runs eagerly rather than compiling a graph in the middle of serving."""

    def __init__(self, model: Transformer, compile: bool = False, backend: str = "inductor"):
        self.model, self.compile = model, compile
        self._run = _compiled_paged(_paged_step_logits, backend) if compile \
            else _paged_step_logits
        self._mixed = _compiled_paged(_paged_mixed_logits, backend) if compile \
            else _paged_mixed_logits

    def __call__(self, ids_B1: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        if not self.compile:
            return self._run(self.model, ids_B1, batch)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return self._run(self.model, ids_B1, batch)

    def mixed(self, parts: list[tuple[torch.Tensor, PagedBatch]],
              stance: str = "eager_on_recompile") -> torch.Tensor:
        if not self.compile:
            return self._mixed(self.model, parts)
        # Without "duck shapes": sizes that happen to be equal while a graph is traced (the
        # two parts' table widths, a width and the chunk's length) stay apart, where torch
        # would make them one size and the graph serve only steps where they are equal.
        with (torch._dynamo.config.patch(capture_scalar_outputs=True),
              torch.fx.experimental._config.patch(use_duck_shape=False),
              torch.compiler.set_stance(stance)):
            return self._mixed(self.model, parts)

    @torch.inference_mode()
    def prepare(self, pool: KVBlockPool, max_batch: int, mixed: bool = True) -> float:
        """Run a step at every batch size up to ``max_batch``, and (``mixed``) the mixed
        steps of the class docstring, on free blocks of ``pool`` (what they held is
        overwritten, as a sequence's prefill would): every graph a server needs is compiled
        before any request. Returns the seconds it took (0.0 when not compiled); a ValueError
        when the model's step does not trace."""
        if not self.compile:
            return 0.0
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        start = time.perf_counter()
        device = pool.keys[0].device
        chunk = PREPARED_CHUNK_POSITIONS

        def ids(rows: int, positions: int) -> torch.Tensor:
            return torch.zeros(rows, positions, dtype=torch.long, device=device)
        blocks = pool.allocate(1)
        chunk_blocks = pool.allocate(pool.blocks_for(chunk))
        try:
            for rows in range(1, max_batch + 1):
                self(ids(rows, 1), PagedBatch(pool, [blocks] * rows, [0] * rows))
            for rows in range(min(max_batch, 2) + 1 if mixed else 0):
                decoding = [(ids(rows, 1), PagedBatch(pool, [blocks] * rows, [0] * rows))
                            ] if rows else []
                self.mixed(decoding + [(ids(1, chunk),
                                        PagedBatch(pool, [chunk_blocks], [0], chunk))],
                           stance="default")
        except GuardOnDataDependentSymNode as error:
            raise ValueError("this model's decoding step does not compile: its Python code "
                             "branches on tensor values (quantized or offloaded experts do, "
                             f"per expert): {str(error).splitlines()[0]}") from None
        finally:
            pool.release(chunk_blocks)
            pool.release(blocks)
        return time.perf_counter() - start
