"""The HTTP server, started for real on a loopback port and called with real clients (httpx
and the official openai client). References: the library's own generate + the tokenizer's
decode (what the server must reproduce), hand-written prompts and texts."""
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from moekit.config import preset
from moekit.model import Transformer, generate, save_model
from moekit.serve import create_app, load_engine
from moekit.serve.engine import Sampling
from moekit.serve.text import TextStream
from moekit.train.chat import render_chat
from moekit.train.tokenizer import train_tokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn
    folder = tmp_path_factory.mktemp("served") / "tiny-bytes"
    torch.manual_seed(0)
    save_model(Transformer(replace(preset("tiny"), vocab_size=257, max_seq_len=64)), folder)
    train_tokenizer([], 257).save(folder)  # byte-level: any text, no download
    engine = load_engine(folder, max_tokens_limit=32)
    app = create_app(engine, api_key=KEY, max_request_bytes=4096)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                   log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.01)
    port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as client:
        yield SimpleNamespace(client=client, engine=engine, url=f"http://127.0.0.1:{port}")
    uvicorn_server.should_exit = True
    thread.join(10)


def _reference(engine, prompts, max_tokens, **sampling):
    """What the library generates for these prompts, decoded, without the end-of-text."""
    tokenizer = engine.tokenizer
    outputs = generate(engine.model, [tokenizer.encode(p) for p in prompts], max_tokens,
                       eos_id=tokenizer.eos_id, **sampling)
    return [tokenizer.decode(ids) for ids in outputs], outputs


def _stream(client, path, body):
    """The parsed events of a streaming request, checking the SSE framing."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_completion_equals_library_generate(server):
    expected, ids = _reference(server.engine, ["Hello there"], 12)
    body = server.client.post("/v1/completions", json={
        "model": "tiny-bytes", "prompt": "Hello there", "max_tokens": 12,
        "temperature": 0}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected[0]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": len(ids[0]),
                             "total_tokens": 11 + len(ids[0])}


def test_seeded_batch_with_n_equals_library_generate(server):
    prompts = ["one prompt", "a second, longer prompt"]
    expected, _ = _reference(server.engine, [p for p in prompts for _ in range(2)], 8,
                             temperature=1.0, seed=7)
    body = server.client.post("/v1/completions", json={
        "prompt": prompts, "n": 2, "max_tokens": 8, "seed": 7}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == expected


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": ["ab", "xyz"], "max_tokens": 10, "seed": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 10, "seed": 3, "n": 2})])
def test_streaming_adds_up_to_the_whole_answer(server, path, body):
    whole = server.client.post(path, json=body).json()
    events = _stream(server.client, path, {**body, "stream_options": {"include_usage": True}})
    texts, finish = {}, {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        part = choice.get("text", choice.get("delta", {}).get("content"))
        texts[choice["index"]] = texts.get(choice["index"], "") + part
        finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    for choice in whole["choices"]:
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert texts[choice["index"]] == text
        assert finish[choice["index"]] == choice["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_stop_strings_cut_the_text_before_them(server):
    full, _ = _reference(server.engine, ["Stop me"], 20)
    stop = next(c for c in full[0][4:] if c != "\ufffd")  # a character the text reaches
    body = {"prompt": "Stop me", "max_tokens": 20, "temperature": 0, "stop": [stop, "never"]}
    answer = server.client.post("/v1/completions", json=body).json()["choices"][0]
    assert answer["text"] == full[0][:full[0].index(stop)]
    assert answer["finish_reason"] == "stop"
    events = _stream(server.client, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in events) == answer["text"]


def test_chat_uses_the_default_template(server):
    expected, _ = _reference(server.engine, ["user: Hi\nassistant:"], 6)
    body = server.client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 6,
        "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected[0]}


def test_chat_without_max_tokens_fills_the_servers_limit(server):
    expected, ids = _reference(server.engine, ["user: Hi\nassistant:"], 32)  # limit 32 < 64 - 19
    body = server.client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}).json()
    assert body["choices"][0]["message"]["content"] == expected[0]
    assert body["usage"]["completion_tokens"] == len(ids[0])


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    expected, _ = _reference(server.engine, ["Hello there"], 5)
    answer = client.completions.create(model="tiny-bytes", prompt="Hello there", max_tokens=5,
                                       temperature=0)
    assert answer.choices[0].text == expected[0]
    chunks = client.chat.completions.create(
        model="tiny-bytes", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=0, stream=True)
    expected, _ = _reference(server.engine, ["user: Hi\nassistant:"], 5)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens=33 is not allowed: this server gives "
                                             "1 to 32"),
    ({"prompt": "x" * 60, "max_tokens": 10}, 400, "exceeds the model context (64)"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"max_tokens": 3}, 400, "prompt: Field required"),
    ({"prompt": ""}, 400, "prompt must not be empty"),
    ({"prompt": "x", "n": 9}, 400, "n=9 is not allowed"),
    ({"prompt": "x", "model": "other"}, 404, "model 'other' does not exist"),
    ({"prompt": "x" * 5000}, 413, "over this server's limit of 4,096"),
])
def test_bad_requests_get_json_errors_and_the_server_goes_on(server, body, status, words):
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert server.client.post("/v1/completions", json={"prompt": "ok",
                                                        "max_tokens": 2}).status_code == 200


def test_malformed_json_wrong_key_and_unknown_path(server):
    response = server.client.post("/v1/completions", content=b'{"prompt": ',
                                  headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON decode error" in response.text
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"},
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert server.client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed


def test_a_client_that_leaves_mid_stream_does_not_block_the_server(server):
    with server.client.stream("POST", "/v1/completions", json={
            "prompt": "long", "max_tokens": 32, "stream": True}) as response:
        next(response.iter_lines())
    answer = server.client.post("/v1/completions", json={"prompt": "next", "max_tokens": 2},
                                timeout=10)
    assert answer.status_code == 200


def test_kv_cache_budget_refuses_what_does_not_fit(server):
    engine = server.engine
    engine.kv_cache_bytes = 1000
    try:  # 4 layers x 2 (K, V) x 2 heads x 32 dims x 4 bytes = 2,048 bytes per position
        with pytest.raises(ValueError, match="needs 12,288 bytes of KV cache; the server's "
                                             "budget is 1,000"):
            engine.complete(["abc"], Sampling(max_tokens=3))
    finally:
        engine.kv_cache_bytes = None


class _Bytes:
    """Byte-level tokenizer stand-in: token = byte, 256 = end of text."""
    eos_id = 256

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_text_stream_holds_back_unfinished_characters_and_stop_prefixes():
    stream = TextStream(_Bytes(), stop=["END"])
    pieces = [stream.add(t) for t in "ab".encode() + "é".encode() + b"EN"]
    # The last 2 characters may begin "END" and wait; "é" is 2 bytes and waits for its second.
    assert pieces == ["", "", "a", "", "b", "é"]
    assert stream.add(ord("D")) == "" and stream.finish == "stop" and stream.text == "abé"
    stream = TextStream(_Bytes(), stop=[])
    assert [stream.add(t) for t in b"hi"] + [stream.add(256)] == ["h", "i", ""]
    assert stream.finish == "stop"


def test_chat_templates():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages, None, "<eos>") == "system: Be brief.\nuser: Hi\nassistant:"
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render_chat(messages, template, "<eos>") == \
        "<|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>"
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat(messages, "{{ messages.pop() }}", "<eos>")  # the sandbox forbids changes
    with pytest.raises(ValueError, match="failed on these messages: no system role"):
        render_chat(messages, "{{ raise_exception('no system role') }}", "<eos>")


def test_cli_serve_bad_arguments(tmp_path, capsys):
    from moekit.cli import main
    assert main(["serve", "--checkpoint", str(tmp_path), "--port", "-1"]) == 2
    assert "--port -1 is not allowed" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "none: not a folder" in capsys.readouterr().err


def test_a_quantized_checkpoint_serves_what_it_generates(tmp_path):
    from moekit.quant import load_for_inference, quantize_model, save_quantized
    folder = tmp_path / "tiny-fp8"
    model = quantize_model(Transformer(replace(preset("tiny"), vocab_size=257)))
    save_quantized(model, folder)
    train_tokenizer([], 257).save(folder)
    engine = load_engine(folder)
    pieces, usage = engine.complete(["Quantized"], Sampling(max_tokens=6, temperature=0))
    text = "".join(piece.text for piece in pieces)
    expected = generate(load_for_inference(folder), [engine.tokenizer.encode("Quantized")], 6,
                        eos_id=engine.tokenizer.eos_id)[0]
    assert text == engine.tokenizer.decode(expected)
    assert usage.completion_tokens == len(expected)


def test_the_serving_example_of_the_docs_works_as_written(tmp_path, monkeypatch):
    """docs/inference.md's `moekit serve --checkpoint runs/tiny` then its request for model
    "tiny", on a run folder named tiny: the served name is the run's, not its checkpoint's."""
    import re
    import shlex

    from fastapi.testclient import TestClient

    from moekit.cli import main
    docs = (Path(__file__).resolve().parent.parent / "docs" / "inference.md").read_text()
    block = re.search(r"```bash\n(pip install -e '\.\[serve\]'.*?)```", docs, re.S).group(1)
    command = next(line for line in block.splitlines() if line.startswith("moekit serve"))
    body = json.loads(re.search(r"-d '(.*?)'", block).group(1))
    monkeypatch.chdir(tmp_path)
    checkpoint = Path(shlex.split(command)[shlex.split(command).index("--checkpoint") + 1])
    save_model(Transformer(replace(preset("tiny"), vocab_size=257, max_seq_len=64)),
               checkpoint / "checkpoints" / "step-000100")
    train_tokenizer([], 257).save(checkpoint / "checkpoints" / "step-000100")
    responses = []

    def serve_once(engine, host, port, api_key, max_request_bytes, **options):
        with TestClient(create_app(engine, api_key, max_request_bytes)) as client:
            responses.append(client.post("/v1/completions", json=body))
            responses.append(client.post("/v1/completions", json={**body,
                                                                  "model": "step-000100"}))
            responses.append(client.get("/v1/models"))

    monkeypatch.setattr("moekit.serve.serve", serve_once)
    assert main(shlex.split(command.split("#")[0])[1:]) == 0
    completion, by_checkpoint_name, models = responses
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == body["model"] == "tiny"
    assert by_checkpoint_name.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


def test_served_model_name_alias(tmp_path):
    from moekit.cli import build_parser
    args = build_parser().parse_args(["serve", "--checkpoint", "x", "--served-model-name", "m"])
    assert args.name == "m"


def test_serving_threads_leave_one_core_to_the_front_end(monkeypatch):
    from moekit.serve import serving_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for torch_threads, expected in ((4, 3), (2, 1), (1, 1)):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=torch_threads: n)
        assert serving_threads("cpu") == expected
    assert serving_threads("cuda") is None  # an accelerator: torch's own
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert serving_threads("cpu") is None  # the environment's choice stands


def test_engine_threads_set_torchs_and_keep_the_tokens(tmp_path, capsys):
    from moekit.cli import main
    from moekit.serve import Engine
    torch.manual_seed(0)
    model = Transformer(replace(preset("tiny"), vocab_size=257, max_seq_len=64))
    tokenizer = train_tokenizer([], 257)
    before = torch.get_num_threads()
    engine = Engine(model, tokenizer, "tiny", threads=1)
    try:
        assert torch.get_num_threads() == 1
        pieces, _ = engine.complete(["Threads"], Sampling(max_tokens=8, temperature=0))
        expected = generate(model, [tokenizer.encode("Threads")], 8, eos_id=tokenizer.eos_id)
        assert "".join(piece.text for piece in pieces) == tokenizer.decode(expected[0])
    finally:
        engine.close()
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads=0 is not allowed"):
        Engine(model, tokenizer, "tiny", threads=0)
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--checkpoint", str(tmp_path), "--threads", "0"])
    assert exit.value.code == 2
    assert "--threads: 0 is not allowed" in capsys.readouterr().err
