#!/usr/bin/env python3
"""Load on ``moekit serve``: N concurrent streaming clients on loopback, as ratios to one client.

    python benchmarks/serve_load.py                      # 1, 4 and 16 clients
    python benchmarks/serve_load.py --clients 1 4 16 --requests 4 --max-tokens 64 --reps 3
    python benchmarks/serve_load.py --in-process          # the engine alone, without HTTP

Builds the tiny preset (random weights, seeded) with a BPE tokenizer trained on the embedded
corpus, starts ``moekit serve`` on it in a process of its own (``--max-batch-size 16``), warms
it up, and then, for each client count N, runs N clients at once, each sending ``--requests``
streaming completions one after another (the same fixed prompts of about 32 tokens, greedy,
``--max-tokens`` each, usage included), and stops by itself. The client counts take turns in
each of ``--reps`` repetitions (the machine's other load then falls on all of them alike). It
prints requests/s and generated tokens/s (the usage the server reports, over the wall time of
a run; medians over the repetitions), time to first
token (request sent -> first text event) and inter-token latency (between a stream's
successive text events; a token whose text is not final yet, such as half a UTF-8 character,
comes with the next) at p50 / p99 over all repetitions' samples, and the ratios to one
client. Clients and server share the
machine's cores, as on a one-box deployment.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

PROMPTS = ["The with statement", "A function definition", "Exceptions are raised when",
           "The import system", "Classes provide a means", "The for statement is used"]


def build_checkpoint(folder: Path) -> None:
    from moekit.config import preset
    from moekit.model import Transformer, save_model
    from moekit.train.data import default_documents
    from moekit.train.tokenizer import train_tokenizer
    config = preset("tiny")
    torch.manual_seed(0)
    save_model(Transformer(replace(config, max_seq_len=max(config.max_seq_len, 256))), folder)
    train_tokenizer(default_documents(), config.vocab_size).save(folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, result: dict):
    sent = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/completions", json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                result["tokens"] += event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    result["ttft"].append(now - sent)
                else:
                    result["itl"].append(now - last)
                last = now
    result["requests"] += 1


async def run_load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    result = {"tokens": 0, "requests": 0, "ttft": [], "itl": []}

    async def client_loop(number: int):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for i in range(requests):
                await one_stream(client, PROMPTS[(number + i) % len(PROMPTS)] * 4, max_tokens,
                                 result)
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(n) for n in range(clients)))
    result["seconds"] = time.perf_counter() - start
    return result


def summary(results: list[dict]) -> dict:
    """Medians of the rates over repetitions; the latency samples of all of them."""
    return {"requests/s": statistics.median(r["requests"] / r["seconds"] for r in results),
            "tokens/s": statistics.median(r["tokens"] / r["seconds"] for r in results),
            "ttft": [t for r in results for t in r["ttft"]],
            "itl": [t for r in results for t in r["itl"]]}


def start_server(folder: Path, port: int, max_batch: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "moekit", "serve", "--checkpoint",
                                str(folder), "--port", str(port), "--max-batch-size",
                                str(max_batch), "--max-streams-per-client", "64"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def run_in_process(engine, clients: int, requests: int, max_tokens: int) -> dict:
    """The same load on the engine itself, one thread per client, without HTTP."""
    from moekit.serve import Sampling
    result, lock = {"tokens": 0, "requests": 0, "ttft": [], "itl": []}, threading.Lock()

    def client_loop(number: int):
        for i in range(requests):
            sent, last = time.perf_counter(), None
            pieces, usage = engine.complete([PROMPTS[(number + i) % len(PROMPTS)] * 4],
                                            Sampling(max_tokens=max_tokens, temperature=0))
            for piece in pieces:
                now = time.perf_counter()
                if piece.text:
                    with lock:
                        result["ttft" if last is None else "itl"].append(
                            now - (sent if last is None else last))
                    last = now
            with lock:
                result["tokens"] += usage.completion_tokens
                result["requests"] += 1
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result["seconds"] = time.perf_counter() - start
    return result


def measure(load, args) -> dict:
    """``load(clients, requests, max_tokens)`` for every client count, taking turns in each
    repetition, after a warm-up; the summary per client count."""
    load(2, 1, 8)
    runs = {n: [] for n in args.clients}
    for _ in range(args.reps):
        for n in args.clients:
            runs[n].append(load(n, args.requests, args.max_tokens))
    return {n: summary(results) for n, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="per client, one by one")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--in-process", action="store_true",
                        help="drive the engine from threads in this process, without HTTP "
                        "(what batching gives before the HTTP layer's costs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_checkpoint(folder)
        if args.in_process:
            from moekit.serve import load_engine
            engine = load_engine(folder, max_batch=args.max_batch_size)
            try:
                rows = measure(lambda *load: run_in_process(engine, *load), args)
            finally:
                engine.close()
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = start_server(folder, port, args.max_batch_size)
            url = f"http://127.0.0.1:{port}"
            try:
                rows = measure(lambda *load: asyncio.run(run_load(url, *load)), args)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
    print(f"moekit {'engine in process' if args.in_process else 'serve'}, tiny preset, "
          f"{args.requests} requests per client of {args.max_tokens} new tokens, greedy, "
          f"streaming, {args.reps} repetitions; {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}")
    print("| clients | requests/s | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
          "tokens/s vs 1 client | ITL p99 vs 1 client |")
    print("|---|---|---|---|---|---|---|")
    base = rows[min(rows)]
    base_rate, base_itl = base["tokens/s"], percentile(base["itl"], 99)
    for clients, row in rows.items():
        rate = row["tokens/s"]
        itl99 = percentile(row["itl"], 99)
        print(f"| {clients} | {row['requests/s']:.2f} | {rate:.0f} | "
              f"{1e3 * statistics.median(row['ttft']):.0f} / "
              f"{1e3 * percentile(row['ttft'], 99):.0f} | "
              f"{1e3 * statistics.median(row['itl']):.1f} / {1e3 * itl99:.1f} | "
              f"{rate / base_rate:.2f}x | {itl99 / base_itl:.2f}x |")


if __name__ == "__main__":
    main()
