"""New requests' prompts folded into the running decoding steps (``ModelRunner.mixed``), in
chunks of a bounded number of tokens.

References: ``generate`` run alone on each request (what every request must get, whichever
steps its prompt shared), the same requests through the separate-prefill path
(``Engine(separate_prefill=True)``), and hand counts of the routes (top_k x tokens forwarded)."""
import json
import time
from dataclasses import replace

import pytest
import torch

from moekit.config import preset
from moekit.model import Transformer, generate
from moekit.serve import Engine
from moekit.serve.engine import RequestFailed, Sampling
from moekit.train.tokenizer import train_tokenizer

CONFIG = replace(preset("tiny"), vocab_size=257, max_seq_len=64)
TOKENIZER = train_tokenizer([], 257)
LONG = "a much longer prompt than one step's budget"  # 43 tokens: 8 chunks of 6 or fewer
JOINING = [(["a"], Sampling(max_tokens=12, temperature=0)),
           ([LONG], Sampling(max_tokens=10, temperature=0)),
           (["Stop me"], None),  # a stop string, set from generate's text below
           (["one", "two, longer"], Sampling(max_tokens=8, temperature=0, n=2)),
           (["quits while its prompt goes in"], Sampling(max_tokens=8, temperature=0)),
           (["leaves after its first token"], Sampling(max_tokens=20, temperature=0))]


def _alone(model, prompts, max_tokens):
    outputs = generate(model, [TOKENIZER.encode(p) for p in prompts], max_tokens,
                       eos_id=TOKENIZER.eos_id)
    return [TOKENIZER.decode(ids) for ids in outputs]


def _texts(ticket) -> list[str]:
    texts = {}
    for piece in ticket:
        texts[piece.index] = texts.get(piece.index, "") + piece.text
    return [texts.get(index, "") for index in range(len(ticket.rows))]


def _serve(model, tmp_path, **options):
    """One request decoding alone, then JOINING submitted together while it runs; the last
    two leave (one while its prompt is still going in, or right after its prefill with
    ``separate_prefill``; one after its first token). Returns the texts of the others, the
    routing log's lines, and every mixed forward's decoding rows and prompt chunk (the
    positions its sequence had cached, its text)."""
    log = tmp_path / f"routing-{len(list(tmp_path.iterdir()))}.jsonl"
    engine = Engine(model, TOKENIZER, "tiny", max_tokens_limit=32, block_size=4, max_batch=16,
                    prefill_tokens_per_step=6, routing_log=log, **options)
    runner, mixed_steps, leaving = engine.scheduler.runner, [], []
    mixed, prefill = runner.mixed, runner.prefill

    def leave_at(prompt_ids):
        if any(TOKENIZER.decode(ids).startswith("quits") for ids in prompt_ids):
            leaving[0].cancel()

    def spy_mixed(tokens, tables, lengths, chunk, chunk_table, chunk_cached):
        mixed_steps.append((len(tokens), chunk_cached, TOKENIZER.decode(chunk)))
        leave_at([chunk] if chunk_cached == 0 else [])
        return mixed(tokens, tables, lengths, chunk, chunk_table, chunk_cached)

    def spy_prefill(prompts, row_blocks):
        leave_at(prompts)
        return prefill(prompts, row_blocks)
    runner.mixed, runner.prefill = spy_mixed, spy_prefill
    try:
        running = engine.submit(["running"], Sampling(max_tokens=30, temperature=0))
        first = next(iter(running))  # it is decoding
        stop = _alone(model, ["Stop me"], 20)[0][4]
        requests = [(p, s or Sampling(max_tokens=20, temperature=0, stop=[stop]))
                    for p, s in JOINING]
        with engine.scheduler._condition:  # all queued before the scheduler takes the first
            tickets = [engine.submit(prompts, sampling) for prompts, sampling in requests]
            leaving.append(tickets[-2])
        while tickets[-1].usage.completion_tokens == 0:  # its text may wait for whole
            time.sleep(0.001)                              # characters: not its pieces
        tickets[-1].cancel()
        texts = [[first.text + _texts(running)[0]]] + [_texts(t) for t in tickets[:-2]]
        for ticket in tickets[-2:]:
            with pytest.raises(RequestFailed, match="client went away"):
                list(ticket)
        assert engine.pool.used_blocks == 0
    finally:
        engine.close()
    # Tokens each request forwarded: every row's prompt and generated tokens but its last.
    forwarded = {ticket.id: sum(len(row.prompt) + row.generated - 1 for row in ticket.rows)
                 for ticket in [running, *tickets]}
    lines = [{**json.loads(line), "forwarded": forwarded[json.loads(line)["request"]]}
             for line in log.read_text().splitlines()]
    return texts, lines, mixed_steps, stop


@pytest.mark.parametrize("changes", [{}, dict(cla_share=2, sliding_window=5)],
                         ids=["gqa", "cla-window"])
def test_requests_joining_a_running_batch_get_what_they_get_alone(tmp_path, changes):
    torch.manual_seed(0)
    model = Transformer(replace(CONFIG, **changes)).eval()
    texts, lines, mixed_steps, stop = _serve(model, tmp_path)
    full = _alone(model, ["Stop me"], 20)[0]
    assert texts == [_alone(model, ["running"], 30), _alone(model, ["a"], 12),
                     _alone(model, [LONG], 10), [full[:full.index(stop)]],
                     _alone(model, ["one", "one", "two, longer", "two, longer"], 8)]
    # Prompts went in beside decoding rows, 6 tokens a step at most, the long one in chunks
    # that continue after the positions its earlier ones cached, each of the n = 2 rows.
    assert all(len(text) <= 6 for _, _, text in mixed_steps)
    chunks = [(cached, text) for _, cached, text in mixed_steps]
    assert chunks[:2] == [(0, "runnin"), (6, "g")]
    assert any(decoding >= 3 for decoding, _, _ in mixed_steps[2:])  # several requests decode
    long_chunks = [(cached, text) for cached, text in chunks if text == LONG[cached:cached + 6]]
    assert [cached for cached, _ in long_chunks] == list(range(0, len(LONG), 6))
    assert "".join(text for _, text in long_chunks) == LONG
    assert chunks.count((0, "one")) == 2
    assert (0, "quits ") in chunks and (6, "while ") not in chunks
    # Each request's routes: every token it forwarded, its prompt's chunks included.
    for line in lines:
        if line["status"] == "ok":
            assert [sum(layer) for layer in line["routed_tokens"]] == \
                [CONFIG.moe.top_k * line["forwarded"]] * CONFIG.num_layers
    assert sorted(line["status"] for line in lines) == ["cancelled"] * 2 + ["ok"] * 5


def test_the_separate_prefill_path_gives_the_same_texts(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    mixed_texts, *_ = _serve(model, tmp_path)
    separate_texts, lines, mixed_steps, _ = _serve(model, tmp_path, separate_prefill=True)
    assert separate_texts == mixed_texts and mixed_steps == []
    assert sorted(line["status"] for line in lines) == ["cancelled"] * 2 + ["ok"] * 5


def test_a_bad_prefill_budget_is_refused():
    with pytest.raises(ValueError, match="prefill_tokens_per_step=0 is not allowed: expected "
                                         "an integer >= 1"):
        Engine(Transformer(CONFIG), TOKENIZER, "tiny", prefill_tokens_per_step=0)
