"""Continuous batching, its safety limits and its metrics, on real loopback servers.

References: the library's ``generate`` run alone on each request (what every request must get,
whatever shares its batch), the model's dense KVCache decoding, and hand counts (routes = top_k
x tokens forwarded)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import httpx
import pytest
import torch

from moekit.config import preset
from moekit.model import Transformer, generate, save_model
from moekit.model.generate import prefill
from moekit.model.paged import KVBlockPool, PagedBatch
from moekit.serve import Engine, create_app
from moekit.serve.engine import Overloaded, RequestFailed, Sampling
from moekit.train.tokenizer import train_tokenizer

CONFIG = replace(preset("tiny"), vocab_size=257, max_seq_len=64)


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CONFIG).eval()


def _start(app):
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served():
    engine = Engine(_model(), train_tokenizer([], 257), "tiny", max_tokens_limit=32,
                    block_size=4, max_batch=16)
    url, stop = _start(create_app(engine))
    with httpx.Client(base_url=url, timeout=30) as client:
        yield SimpleNamespace(engine=engine, client=client, url=url)
    stop()
    engine.close()


def _alone(engine, prompts, max_tokens, **sampling):
    """What generate gives these prompts run together alone, decoded (end of text dropped)."""
    tokenizer = engine.tokenizer
    outputs = generate(engine.model, [tokenizer.encode(p) for p in prompts], max_tokens,
                       eos_id=tokenizer.eos_id, **sampling)
    return [tokenizer.decode(ids) for ids in outputs]


@contextlib.contextmanager
def _forwards(model):
    """The shapes of the token ids of every forward while in the block, one list per forward:
    the one batch of a decoding step, or the parts of a mixed one (``run_parts``)."""
    shapes, forward, run_parts = [], model.forward, model.run_parts

    def spy_forward(input_ids, *args, **kwargs):
        shapes.append([tuple(input_ids.shape)])
        return forward(input_ids, *args, **kwargs)

    def spy_parts(parts):
        shapes.append([tuple(ids.shape) for ids, _ in parts])
        return run_parts(parts)
    model.forward, model.run_parts = spy_forward, spy_parts
    try:
        yield shapes
    finally:
        model.forward, model.run_parts = forward, run_parts


def _wait_until(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _metric(text, name, **labels):
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else " ")):
            found = re.search(r"\{(.*)\}", line)
            if not labels or ",".join(sorted(found.group(1).split(","))) == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("window", [None, 3])
def test_paged_rows_at_different_positions_decode_as_each_alone(window):
    torch.manual_seed(0)
    model = Transformer(replace(CONFIG, sliding_window=window)).eval()
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5] * 11]
    pool = KVBlockPool(CONFIG, num_blocks=20, block_size=4)
    tables, lengths, tokens = [], [], []
    with torch.inference_mode():
        for prompt in prompts:
            logits, cache = prefill(model, [prompt], len(prompt))
            blocks = pool.allocate(pool.blocks_for(len(prompt) + 9))
            pool.write(blocks, [keys[0] for keys in cache.keys],
                       [values[0] for values in cache.values])
            tables.append(blocks), lengths.append(len(prompt))
            tokens.append(logits[0, -1].argmax().item())
        outputs = [[token] for token in tokens]
        for _ in range(9):
            batch = PagedBatch(pool, tables, lengths)
            tokens = model(torch.tensor(tokens)[:, None], cache=batch).logits[:, -1].argmax(-1)
            tokens, lengths = tokens.tolist(), [length + 1 for length in lengths]
            for output, token in zip(outputs, tokens):
                output.append(token)
    assert outputs == [generate(model, [prompt], 10)[0] for prompt in prompts]
    assert pool.used_blocks == 4 + 3 + 5  # ceil((5, 3, 11) + 9 over 4)
    with pytest.raises(ValueError, match="do not fit a row's KV blocks"):
        PagedBatch(pool, [tables[0]], [20])
    with pytest.raises(ValueError, match="new_positions=1; the forward brings 2"):
        model(torch.ones(1, 2, dtype=torch.long), cache=PagedBatch(pool, [tables[0]], [0]))


def test_requests_share_decoding_steps_and_get_what_they_get_alone(served):
    """Mixed lengths, a stop string, n = 2 with a seed, and a greedy multi-prompt request,
    submitted together: the decode forwards mix requests (batch wider than any one request),
    and each request's text is generate's for it alone."""
    engine = served.engine
    full = _alone(engine, ["Stop me"], 20)[0]
    stop = next(c for c in full[3:] if c != "\ufffd")
    requests = [(["a"], Sampling(max_tokens=12, temperature=0)),
                (["a much longer prompt than the others"], Sampling(max_tokens=20,
                                                                     temperature=0)),
                (["Stop me"], Sampling(max_tokens=20, temperature=0, stop=[stop])),
                (["one", "two, longer"], Sampling(max_tokens=8, temperature=1.0, seed=7,
                                                  n=2)),
                (["xy", "a third prompt"], Sampling(max_tokens=6, temperature=0))]
    with _forwards(engine.model) as forwards:
        with engine.scheduler._condition:  # all queued before the scheduler takes the first
            tickets = [engine.submit(prompts, sampling) for prompts, sampling in requests]
        answers = []
        for ticket in tickets:
            texts = {}
            for piece in ticket:
                texts[piece.index] = texts.get(piece.index, "") + piece.text
            answers.append([texts.get(i, "") for i in range(len(ticket.rows))])
    # more than one request's rows in a decoding step
    assert max(rows for parts in forwards for rows, seq in parts if seq == 1) > 4
    assert answers[0] == _alone(engine, ["a"], 12)
    assert answers[1] == _alone(engine, ["a much longer prompt than the others"], 20)
    assert answers[2] == [full[:full.index(stop)]]
    assert answers[3] == _alone(engine, ["one", "one", "two, longer", "two, longer"], 8,
                                temperature=1.0, seed=7)
    assert answers[4] == _alone(engine, ["xy", "a third prompt"], 6)
    _wait_until(lambda: engine.pool.used_blocks == 0)


def test_streams_on_an_event_loop_get_one_wake_up_per_forward(served):
    """Pieces for readers on an event loop (the HTTP server's way) are handed over once per
    forward for all streams, not once per piece; the texts stay generate's alone."""
    import asyncio
    engine = served.engine
    prompts = ["a", "bb bb", "a longer prompt", "x"]

    async def read(ticket):
        text = ""
        while (piece := await ticket.next_piece()) is not None:
            text += piece.text
        return text, ticket.usage.completion_tokens

    async def run():
        loop = asyncio.get_running_loop()
        wake_ups, threadsafe = [], loop.call_soon_threadsafe

        def counted(callback, *args):
            wake_ups.append(1)
            return threadsafe(callback, *args)
        loop.call_soon_threadsafe = counted
        with engine.scheduler._condition:  # all queued before the scheduler takes the first
            tickets = [engine.submit([p], Sampling(max_tokens=12, temperature=0), loop)
                       for p in prompts]
        return await asyncio.gather(*map(read, tickets)), len(wake_ups)
    with _forwards(engine.model) as forwards:
        answers, wake_ups = asyncio.run(run())
    assert [text for text, _ in answers] == [_alone(engine, [p], 12)[0] for p in prompts]
    pieces = sum(tokens for _, tokens in answers)  # a piece per token at most, + the ends
    assert wake_ups <= len(forwards) < pieces
    _wait_until(lambda: engine.pool.used_blocks == 0)


def test_a_client_leaving_mid_stream_frees_its_blocks_and_spares_the_others(served):
    engine, client = served.engine, served.client
    prompts = ["first", "second one", "the third, longest prompt"]

    def whole(prompt):
        return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0}).json()
    with ThreadPoolExecutor(3) as pool:
        with client.stream("POST", "/v1/completions", json={
                "prompt": "I leave early", "max_tokens": 32, "stream": True}) as response:
            next(response.iter_lines())
            others = list(pool.map(whole, prompts))
    for prompt, answer in zip(prompts, others):
        assert answer["choices"][0]["text"] == _alone(engine, [prompt], 24)[0]
    _wait_until(lambda: engine.pool.used_blocks == 0 and engine.scheduler.idle())
    metrics = client.get("/metrics").text
    assert _metric(metrics, "moekit_requests_total", status="cancelled") >= 1
    assert _metric(metrics, "moekit_kv_blocks_used") == 0


def test_metrics_count_requests_tokens_and_every_route(served):
    engine, client = served.engine, served.client
    before = client.get("/metrics").text
    body = client.post("/v1/completions", json={"prompt": "count my routes",
                                                "max_tokens": 5, "temperature": 0}).json()
    after = client.get("/metrics").text
    usage = body["usage"]
    # Forwarded tokens: the prompt, then every generated token but the last.
    forwarded = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    for layer in range(CONFIG.num_layers):
        routed = sum(_metric(after, "moekit_routed_tokens_total", layer=layer, expert=e)
                     - _metric(before, "moekit_routed_tokens_total", layer=layer, expert=e)
                     for e in range(CONFIG.moe.num_experts))
        assert routed == CONFIG.moe.top_k * forwarded
    for name, grown in (("moekit_requests_total", 1),
                        ("moekit_prompt_tokens_total", usage["prompt_tokens"]),
                        ("moekit_generation_tokens_total", usage["completion_tokens"]),
                        ("moekit_time_to_first_token_seconds_count", 1),
                        ("moekit_inter_token_latency_seconds_count",
                         usage["completion_tokens"] - 1)):
        labels = {"status": "ok"} if name == "moekit_requests_total" else {}
        assert _metric(after, name, **labels) - _metric(before, name, **labels) == grown, name
    assert _metric(after, "moekit_kv_blocks_total") == engine.pool.num_blocks
    assert client.get("/health").json() == {"status": "ok"}


def test_200_mixed_requests_leave_the_server_answering_and_no_blocks_held(served):
    engine, client, url = served.engine, served.client, served.url
    prompts = ["alpha", "a longer beta prompt", "g"]
    expected = {p: _alone(engine, [p], 6)[0] for p in prompts}
    bad = [{"prompt": "x", "max_tokens": 33}, {"prompt": ""}, {"prompt": "x", "n": 9},
           {"prompt": "x", "model": "other"}, {"max_tokens": 2}]

    def one(i):
        with httpx.Client(base_url=url, timeout=30) as own:
            kind = i % 4
            if kind == 0:
                prompt = prompts[i % 3]
                answer = own.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6,
                                                           "temperature": 0})
                return answer.status_code == 200 and \
                    answer.json()["choices"][0]["text"] == expected[prompt]
            if kind == 1:
                with own.stream("POST", "/v1/completions", json={
                        "prompt": prompts[i % 3], "max_tokens": 6, "temperature": 0,
                        "stream": True}) as response:
                    lines = [line for line in response.iter_lines() if line]
                text = "".join(json.loads(line[6:])["choices"][0]["text"]
                               for line in lines[:-1])
                return lines[-1] == "data: [DONE]" and text == expected[prompts[i % 3]]
            if kind == 2:
                response = own.post("/v1/completions", json=bad[i % len(bad)])
                return 400 <= response.status_code < 500 and "error" in response.json()
            with own.stream("POST", "/v1/completions", json={
                    "prompt": "abandon", "max_tokens": 32, "stream": True}) as response:
                next(response.iter_lines())  # then leave
            return True
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)
    _wait_until(lambda: engine.pool.used_blocks == 0 and engine.scheduler.idle())
    assert client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}
                       ).status_code == 200


@pytest.fixture(scope="module")
def tight():
    """A server at its limits: one sequence at a time, one waiting, one request per client,
    and a model that takes at least 5 ms per forward, so a long request lasts."""
    model = _model()
    forward = model.forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)
    model.forward = slow
    engine = Engine(model, train_tokenizer([], 257), "tiny", max_tokens_limit=50,
                    block_size=4, max_batch=1, max_waiting=1, request_timeout=0.15)
    url, stop = _start(create_app(engine, max_streams_per_client=1))
    with httpx.Client(base_url=url, timeout=30) as client:
        yield SimpleNamespace(engine=engine, client=client)
    stop()
    engine.close()


def test_a_full_queue_answers_429_with_retry_after(tight):
    engine = tight.engine
    running = engine.submit(["runs"], Sampling(max_tokens=50))
    _wait_until(lambda: running.rows)
    waiting = engine.submit(["waits"], Sampling(max_tokens=50))
    with pytest.raises(Overloaded):
        engine.submit(["one more"], Sampling(max_tokens=1))
    response = tight.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert "requests are waiting" in response.json()["error"]["message"]
    for ticket in (running, waiting):
        ticket.cancel()
    _wait_until(lambda: engine.pool.used_blocks == 0 and engine.scheduler.idle())


def test_one_client_may_not_hold_more_streams_than_its_cap(tight):
    with tight.client.stream("POST", "/v1/completions", json={
            "prompt": "mine", "max_tokens": 50, "stream": True}):
        # Its headers have come: it holds its slot (its text may wait for whole characters).
        second = tight.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert second.status_code == 429
    assert "1 requests in flight" in second.json()["error"]["message"]


def test_the_deadline_ends_a_request_with_504_or_an_error_event(tight):
    """50 tokens take >= 0.25 s on this model; the deadline is 0.15 s."""
    response = tight.client.post("/v1/completions", json={"prompt": "slow", "max_tokens": 50})
    assert response.status_code == 504
    assert "deadline of 0.15 s" in response.json()["error"]["message"]
    with tight.client.stream("POST", "/v1/completions", json={
            "prompt": "slow", "max_tokens": 50, "stream": True}) as streamed:
        lines = [line for line in streamed.iter_lines() if line]
    assert "deadline" in json.loads(lines[-2][6:])["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    with pytest.raises(RequestFailed, match="deadline"):
        list(tight.engine.complete(["slow"], Sampling(max_tokens=50))[0])
    _wait_until(lambda: tight.engine.pool.used_blocks == 0)


def test_requests_that_can_never_fit_are_refused_at_once():
    engine = Engine(_model(), train_tokenizer([], 257), "tiny", kv_cache_memory=8 * 2048 * 4,
                    block_size=4, max_batch=2)
    try:  # 8 blocks of 4 positions
        with pytest.raises(ValueError, match="needs 9 KV blocks; the server's whole pool is 8"):
            engine.submit(["a" * 10], Sampling(max_tokens=24))
        with pytest.raises(ValueError, match="decodes 3 sequences .* batch holds 2"):
            engine.submit(["a"], Sampling(max_tokens=2, n=3))
    finally:
        engine.close()
    with pytest.raises(ValueError, match="holds no block"):
        Engine(_model(), train_tokenizer([], 257), "tiny", kv_cache_memory=100)


def test_routing_log_has_each_requests_routes(tmp_path):
    log = tmp_path / "routing.jsonl"
    engine = Engine(_model(), train_tokenizer([], 257), "tiny", routing_log=log)
    try:
        answers = [engine.complete([p], Sampling(max_tokens=4, temperature=0))
                   for p in ("first", "the second")]
        for pieces, _ in answers:
            list(pieces)
    finally:
        engine.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["prompt_tokens"] for line in lines] == [5, 10]
    for line in lines:
        forwarded = line["prompt_tokens"] + line["completion_tokens"] - 1
        assert line["layers"] == list(range(CONFIG.num_layers))
        assert [sum(per_layer) for per_layer in line["routed_tokens"]] == \
            [CONFIG.moe.top_k * forwarded] * CONFIG.num_layers


def test_cli_sigterm_drains_the_running_stream_and_exits_0(tmp_path):
    folder = tmp_path / "tiny"
    save_model(_model(), folder)
    train_tokenizer([], 257).save(folder)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moekit", "serve", "--checkpoint", str(folder), "--port",
         str(port), "--shutdown-timeout", "20"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: _answers(url), seconds=60)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
                "prompt": "drain me", "max_tokens": 48, "temperature": 0,
                "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # finished, not cut
        assert process.wait(30) == 0
        assert not _answers(url)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _answers(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_once_shutting_down_requests_get_503_and_health_says_so():
    from fastapi.testclient import TestClient
    engine = Engine(_model(), train_tokenizer([], 257), "tiny")
    try:
        with TestClient(create_app(engine)) as client:
            assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}
                               ).status_code == 200
            engine.scheduler.stop_admitting()
            response = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert response.status_code == 503
            assert response.json()["error"]["message"] == "the server is shutting down"
            assert client.get("/health").status_code == 503
    finally:
        engine.close()


def test_an_engine_failure_fails_its_requests_and_the_next_ones_are_served():
    engine = Engine(_model(), train_tokenizer([], 257), "tiny")
    forward, calls = engine.model.forward, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a decoding step
            raise RuntimeError("boom")
        return forward(*args, **kwargs)
    engine.model.forward = fails_once
    try:
        with pytest.raises(RequestFailed, match="the engine failed: RuntimeError"):
            list(engine.complete(["first"], Sampling(max_tokens=8, temperature=0))[0])
        assert engine.pool.used_blocks == 0
        pieces, _ = engine.complete(["next"], Sampling(max_tokens=4, temperature=0))
        assert "".join(p.text for p in pieces) == _alone(engine, ["next"], 4)[0]
    finally:
        engine.close()


@pytest.mark.parametrize("flags, words", [
    (["--kv-cache-memory", "5XB"], "'5XB' is not a size"),
    (["--kv-cache-memory", "100"], "a KV cache of 100 bytes holds no block of 16 positions"),
    (["--max-batch-size", "0"], "0 is not allowed: expected an integer >= 1"),
    (["--request-timeout", "-1"], "-1.0 is not allowed: expected a number > 0"),
    (["--log-routing", "EXISTING"], "exists and is not empty: pass --overwrite"),
    (["--log-routing", "CHECKPOINT/routing.jsonl"], "writing there would destroy it"),
    (["--compile", "--expert-memory", "1GB"], "--compile does not go with --expert-memory"),
])
def test_cli_serve_refuses_bad_batching_flags_in_one_line(tmp_path, capsys, flags, words):
    from moekit.cli import main
    folder = tmp_path / "tiny"
    save_model(_model(), folder)
    train_tokenizer([], 257).save(folder)
    existing = tmp_path / "routing.jsonl"
    existing.write_text("kept\n")
    flags = [f.replace("EXISTING", str(existing)).replace("CHECKPOINT", str(folder))
             for f in flags]
    try:
        status = main(["serve", "--checkpoint", str(folder), *flags])
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert words in error and len(error.splitlines()) == 1
    assert existing.read_text() == "kept\n" and not (folder / "routing.jsonl").exists()
