"""Serving split across processes (``moekit serve --split auto --nproc 2``): real processes on
gloo, each ended by the test. References: the same checkpoint on one process (greedy tokens);
the clock, for how soon a killed rank stops the server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import torch

from moekit.cli import main
from moekit.config import preset
from moekit.model import Transformer, generate
from moekit.quant import load_for_inference, quantize_model, save_quantized
from moekit.serve import Engine, Sampling
from moekit.serve.runner import ModelRunner
from moekit.train.tokenizer import train_tokenizer

CONFIG = replace(preset("tiny"), vocab_size=257, max_seq_len=128)
TIMEOUT_S = 3  # --collective-timeout of the server test
# What a killed rank may take beyond the collective timeout to stop the server: the failed
# step's 503, uvicorn's shutdown, the elastic agent ending the processes (measured: 1-3 s).
MARGIN_S = 10
# A stopped (SIGSTOP) rank cannot act on the SIGTERM that torch's elastic agent sends when
# another rank fails: the agent waits its fixed 30 s grace before SIGKILL (measured exit: 34.6 s).
AGENT_GRACE_S = 30


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    torch.manual_seed(0)
    model = quantize_model(Transformer(CONFIG).eval(), experts="int8", attention="int8")
    folder = tmp_path_factory.mktemp("split") / "q"
    save_quantized(model, folder)
    train_tokenizer([], 257).save(folder)  # byte-level: any text, no download
    return folder


def test_an_idle_scheduler_keeps_a_split_runner_alive_and_closes_it_once():
    # A split runner's followers wait in a collective for the next call; while no request
    # comes, the scheduler calls idle() every idle_call_s so that the wait never times out.
    calls = []

    class Recording(ModelRunner):
        idle_call_s = 0.02

        def idle(self):
            calls.append("idle")

        def close(self):
            calls.append("close")

    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    tokenizer = train_tokenizer([], 257)
    engine = Engine(model, tokenizer, "tiny", runner=Recording)
    try:
        deadline = time.monotonic() + 10
        while calls.count("idle") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        pieces, _ = engine.complete(["Hi"], Sampling(max_tokens=4, temperature=0))
        text = "".join(piece.text for piece in pieces)
    finally:
        engine.close()
    assert calls.count("idle") >= 3 and calls[-1] == "close" and calls.count("close") == 1
    expected = generate(model, [tokenizer.encode("Hi")], 4, eos_id=tokenizer.eos_id)[0]
    assert text == tokenizer.decode(expected)


@pytest.mark.parametrize("flags, words", [
    (["--nproc", "2"], "--nproc 2 serves one model over 2 processes: add --split auto"),
    (["--split", "auto", "--expert-memory", "1GB"], "--split and --expert-memory do not go"),
])
def test_bad_process_flags_are_one_line_and_exit_code_2(quantized, capsys, flags, words):
    assert main(["serve", "--checkpoint", str(quantized), *flags]) == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ranks(agent: subprocess.Popen) -> dict[int, int]:
    """pid of each rank the elastic agent started, from the RANK in its environment."""
    ranks = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                variables = dict(v.split(b"=", 1) for v in environ.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == agent.pid and b"RANK" in variables:
            ranks[int(variables[b"RANK"])] = pid
    return ranks


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "stalls"])
def test_split_server_gives_one_process_tokens_and_stops_when_a_rank_fails(quantized, failure):
    tokenizer = train_tokenizer([], 257)
    expected = tokenizer.decode(generate(load_for_inference(quantized),
                                         [tokenizer.encode("Hello")], 12)[0])
    port = _free_port()
    agent = subprocess.Popen(
        [sys.executable, "-m", "moekit", "serve", "--checkpoint", str(quantized), "--nproc",
         "2", "--split", "auto", "--port", str(port), "--collective-timeout", str(TIMEOUT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    ranks = {}
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            assert agent.poll() is None and time.monotonic() < deadline, agent.stdout.read()
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/completions", timeout=30, json={
            "prompt": "Hello", "max_tokens": 12, "temperature": 0}).json()
        assert answer["choices"][0]["text"] == expected
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "prompt": "Hello", "max_tokens": 120, "temperature": 0,
                "stream": True}) as response, ThreadPoolExecutor(1) as pool:
            lines = response.iter_lines()
            next(lines)  # decoding on both ranks
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", timeout=60, json={
                "prompt": "Hi", "max_tokens": 100, "temperature": 0})
            while "moekit_batch_size 2.0" not in httpx.get(f"{url}/metrics").text:
                time.sleep(0.01)  # both decoding: the second one's answer not yet begun
            ranks = _ranks(agent)
            os.kill(ranks[1], failure)
            killed = time.monotonic()
            rest = [line for line in lines if line]
            refused = waiting.result()
            refused_after = time.monotonic() - killed
        assert rest[-1] == "data: [DONE]" and "a serving process failed" in rest[-2]
        assert refused.status_code == 503, refused.text
        assert refused_after < TIMEOUT_S + MARGIN_S
        code = agent.wait(TIMEOUT_S + MARGIN_S + (AGENT_GRACE_S if failure == signal.SIGSTOP else 0))
        stopped = time.monotonic() - killed
        assert code != 0
        print(f"{failure.name} to rank 1: 503 after {refused_after:.1f} s, the server exited "
              f"{code} after {stopped:.1f} s "
              f"(--collective-timeout {TIMEOUT_S})")
        assert not _healthy(url)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        # Anything left behind: the agent's group, and each rank by pid (the agent starts each
        # in a session of its own, and a stopped one outlives the agent's SIGTERM).
        for kill, pid in [(os.killpg, agent.pid), *((os.kill, rank) for rank in ranks.values())]:
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
