"""The serving engine's decoding step compiled (``Engine(compile=True)``, ``moekit serve
--compile``) and the scheduler's sampling of a whole step at once.

References: the eager engine on the same requests (the compiled one must give its greedy
tokens, whatever the batch size and the block tables' width of each step), torch.compile's own
count of the graphs it made, and a per-row argmax / ``sample_next`` with each request's seed.
Inductor's code generation takes minutes on 2 cores: these tests trace with
``backend="aot_eager"`` (dynamo and AOT autograd, no code generation);
``benchmarks/serve_step.py --compile`` measures the inductor-compiled step and checks its
tokens."""
import itertools
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from moekit.config import preset
from moekit.model import Transformer
from moekit.model.decode_step import PagedDecodeStep
from moekit.model.generate import sample_next
from moekit.model.paged import KVBlockPool, PagedBatch
from moekit.quant import quantize_model
from moekit.serve import Engine
from moekit.serve.engine import Sampling
from moekit.serve.scheduler import Scheduler
from moekit.train.tokenizer import train_tokenizer

# The tiny preset (Skywork's adaptive coefficient on, whose statistics read a scalar) on two
# layers, a byte vocabulary and a short context.
CONFIG = replace(preset("tiny"), vocab_size=257, max_seq_len=64, num_layers=2)
TOKENIZER = train_tokenizer([], 257)
# Mixed lengths (blocks of 4 positions: tables 4 to 10 blocks wide), a seeded n = 2.
REQUESTS = [(["a"], Sampling(max_tokens=14, temperature=0)),
            (["a much longer prompt than the"], Sampling(max_tokens=12, temperature=0)),
            (["one", "two, longer"], Sampling(max_tokens=9, temperature=1.0, seed=7, n=2)),
            (["xy"], Sampling(max_tokens=3, temperature=0)),
            (["a third prompt"], Sampling(max_tokens=6, temperature=0))]


def _model():
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    model.reset_parameters(std=0.3)  # sharp logits: no near-ties for float rounding to flip
    return model


class _Spy:
    """A decoding step that records the batch size and table width of every decoding step,
    and the parts' shapes of every mixed one (decoding rows and a prompt chunk)."""

    def __init__(self, step):
        self.step, self.decoding, self.mixing = step, [], []

    def __call__(self, ids_B1, batch):
        self.decoding.append(tuple(batch.table_BN.shape))
        return self.step(ids_B1, batch)

    def mixed(self, parts):
        self.mixing.append([tuple(ids.shape) for ids, _ in parts])
        return self.step.mixed(parts)


def _serve_together(engine):
    """Every request submitted before the scheduler takes the first; their texts, and the
    shapes of every step (``_Spy``)."""
    spy = engine.scheduler.runner.step = _Spy(engine.scheduler.runner.step)
    with engine.scheduler._condition:
        tickets = [engine.submit(prompts, sampling) for prompts, sampling in REQUESTS]
    return [_completions(ticket) for ticket in tickets], spy


def _completions(ticket) -> list[str]:
    """Each completion's text (its pieces joined), by index."""
    by_index = itertools.groupby(sorted(ticket, key=lambda piece: piece.index),  # stable
                                 key=lambda piece: piece.index)
    return ["".join(piece.text for piece in pieces) for _, pieces in by_index]


def test_the_compiled_engine_gives_the_eager_tokens_and_six_graphs_serve_every_step():
    eager = Engine(_model(), TOKENIZER, "tiny", block_size=4, max_batch=6)
    try:
        expected, _ = _serve_together(eager)
    finally:
        eager.close()
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled = Engine(_model(), TOKENIZER, "tiny", block_size=4, max_batch=6, compile=True,
                      compile_backend="aot_eager")
    try:
        assert compiled.compile_seconds > 0
        # Decoding: one row, two rows (the MoE layers' small-batch path) and three or more:
        # sizes of 1 are specialised by torch, and the small-batch path is chosen by the
        # route count. Mixed: a one-row chunk after no, one, and two or more decoding rows.
        assert counters["stats"]["unique_graphs"] - graphs == 3 + 3
        assert sum(counters["graph_break"].values()) == breaks
        graphs = counters["stats"]["unique_graphs"]
        texts, steps = _serve_together(compiled)
        assert compiled.pool.used_blocks == 0
    finally:
        compiled.close()
    assert texts == expected
    assert counters["stats"]["unique_graphs"] == graphs  # none compiled while serving
    assert len({rows for rows, _ in steps.decoding}) >= 3
    assert len({width for _, width in steps.decoding} - {2}) >= 2  # not the prepared width
    # Mixed steps that prepared graphs serve (a chunk of 3 or more positions after one, and
    # after several decoding rows; after none: the next test), and one that none does (a
    # one-token prompt, run eagerly).
    chunk_after = {parts[0][0] for parts in steps.mixing if len(parts) == 2
                   and parts[1][1] >= 3}
    assert 1 in chunk_after and max(chunk_after) >= 2
    assert [(1, 1)] in steps.mixing


def test_the_prepared_mixed_graphs_serve_any_chunk_length_and_table_width():
    """A one-row prompt chunk of 3 or more positions, after any number of decoding rows and
    over tables of any width, runs on the graphs made at start (torch.compile's
    "fail_on_recompile" stance would raise otherwise) and gives the eager step's logits."""
    model = _model()
    pool = KVBlockPool(CONFIG, num_blocks=128, block_size=4)
    step = PagedDecodeStep(model, compile=True, backend="aot_eager")
    step.prepare(pool, max_batch=4)
    with torch.inference_mode():
        for rows, chunk, cached in [(0, 5, 0), (1, 17, 3), (3, 9, 10), (7, 30, 20)]:
            # The decoding rows' tables one block wider than the chunk's.
            tables = [pool.allocate(pool.blocks_for(cached + chunk + 1) + (row < rows))
                      for row in range(rows + 1)]

            def parts():
                decoding = [(torch.arange(rows)[:, None], PagedBatch(pool, tables[:rows],
                                                                     [cached] * rows))
                            ] if rows else []
                return decoding + [(torch.arange(chunk)[None] % 200, PagedBatch(
                    pool, tables[rows:], [cached], new_positions=chunk))]
            compiled_logits = step.mixed(parts(), stance="fail_on_recompile")
            eager_logits = PagedDecodeStep(model).mixed(parts())  # the same keys rewritten
            torch.testing.assert_close(compiled_logits, eager_logits)
            for table in tables:
                pool.release(table)


def test_a_step_that_does_not_trace_is_refused_when_the_engine_starts():
    model = _model()
    quantize_model(model, experts="int8", attention=None)  # its experts loop over counts
    with pytest.raises(ValueError, match="decoding step does not compile: its Python code "
                                         "branches on tensor values"):
        Engine(model, TOKENIZER, "tiny", block_size=4, max_batch=3, compile=True,
               compile_backend="aot_eager")


class _HostReads(TorchFunctionMode):
    """Counts the reads of tensor values back to Python."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_step_samples_every_request_in_one_read_and_a_seed_draws_as_it_would_alone():
    torch.manual_seed(0)
    logits_BV = torch.randn(7, 50)
    sampled = [SimpleNamespace(sampling=Sampling(temperature=0.7, top_p=0.9), generator=None)
               for _ in range(2)]
    seeded = SimpleNamespace(sampling=Sampling(temperature=1.0, seed=3),
                             generator=torch.Generator().manual_seed(3))
    greedy = SimpleNamespace(sampling=Sampling(temperature=0), generator=None)
    groups = [(greedy, [0, 1]), (sampled[0], [2]), (seeded, [3, 4]), (sampled[1], [5]),
              (greedy, [6])]
    with _HostReads() as reads:
        tokens = Scheduler._sample(groups, logits_BV)
    assert reads.count == 1
    assert [len(row_tokens) for row_tokens in tokens] == [2, 1, 2, 1, 1]
    assert tokens[0] + tokens[4] == logits_BV[[0, 1, 6]].argmax(-1).tolist()
    assert tokens[2] == sample_next(logits_BV[3:5], 1.0, generator=torch.Generator(
        ).manual_seed(3)).tolist()
    for row, (token,) in ((2, tokens[1]), (5, tokens[3])):  # within the top-p set
        probs_V = (logits_BV[row] / 0.7).softmax(-1)
        ordered = probs_V.sort(descending=True).values
        assert probs_V[token] >= ordered[(ordered.cumsum(0) < 0.9).sum()]
