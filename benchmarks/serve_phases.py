#!/usr/bin/env python3
"""Where ``moekit serve``'s time goes under streaming load: the scheduler's phases and the CPU
time of its threads.

    python benchmarks/serve_phases.py                    # eager, torch's threads as served
    python benchmarks/serve_phases.py --compile --threads 2
    python benchmarks/serve_phases.py --separate-prefill --clients 1   # prefill apart, 1 client
    python benchmarks/serve_phases.py --compile --pure-python-http     # uvicorn's asyncio + h11

Serves the tiny checkpoint of ``benchmarks/serve_load.py`` over HTTP in this process (the
server of ``moekit serve``: its event loop in the main thread, the scheduler in its own),
warms it up, and drives it from a separate client process with ``serve_load``'s streaming
clients (``--clients`` at once, ``--requests`` greedy completions of ``--max-tokens`` each).
During the load it sums the wall time of the scheduler's phases: the decoding forward
(``ModelRunner.decode``), the decoding forward with a new request's prompt chunk in it
(``ModelRunner.mixed``), the prefill forward of ``--separate-prefill``
(``ModelRunner.prefill``), the text of each row and step (``TextStream.add``) and the
hand-over of pieces to the event loop (``scheduler.deliver``), and reads the CPU time of the scheduler thread and of the main thread
(the event loop: HTTP, JSON, server-sent events) from their thread clocks. ``--threads``:
torch's threads for the forwards (default: ``serving_threads``, what ``moekit serve`` picks);
one count per run, since compiled kernels keep the count they were made for.
``--pure-python-http``: uvicorn on asyncio's event loop and the h11 parser instead of uvloop and
httptools (what ``serve`` picks): the front end's Python holds the GIL that the scheduler
thread needs between its kernels, so its cost shows in the forwards' times. Timings: run it
alone (``flock -x /tmp/bench.lock`` here).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from serve_load import build_checkpoint, free_port

import moekit.serve.scheduler as scheduler_module
from moekit.serve import load_engine, serve, serving_threads
from moekit.serve.text import TextStream

CLIENT = """
import asyncio, sys
sys.path.insert(0, {benchmarks!r})
from serve_load import run_load
asyncio.run(run_load({url!r}, 2, 1, 8))  # warm-up
print("start", flush=True)
result = asyncio.run(run_load({url!r}, {clients}, {requests}, {max_tokens}))
print(result["tokens"], result["seconds"], flush=True)
"""


def thread_seconds(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class Phases:
    """Wall seconds and calls per phase, summed while ``on``."""

    def __init__(self):
        self.seconds, self.calls, self.on = defaultdict(float), defaultdict(int), False

    def timed(self, name: str, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1
        return run


def measure(folder: Path, compile: bool, threads: int, args) -> dict:
    engine = load_engine(folder, max_batch=16, compile=compile, threads=threads,
                         separate_prefill=args.separate_prefill)
    phases, runner = Phases(), engine.scheduler.runner
    runner.decode = phases.timed("decoding forward", runner.decode)
    runner.mixed = phases.timed("decoding forward with a prompt chunk", runner.mixed)
    runner.prefill = phases.timed("prefill forward", runner.prefill)
    text_add, deliver = TextStream.add, scheduler_module.deliver
    TextStream.add = phases.timed("text (TextStream.add)", text_add)
    scheduler_module.deliver = phases.timed("hand-over (deliver)", deliver)
    scheduler = next(t for t in threading.enumerate() if t.name == "moekit-scheduler")
    port, result = free_port(), {}

    def drive():
        code = CLIENT.format(benchmarks=str(Path(__file__).parent), url=f"http://127.0.0.1:{port}",
                             clients=args.clients, requests=args.requests,
                             max_tokens=args.max_tokens)
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              text=True) as client:
            for line in client.stdout:
                if line.startswith("start"):
                    result["cpu"] = (thread_seconds(scheduler),
                                     thread_seconds(threading.main_thread()))
                    result["start"], phases.on = time.perf_counter(), True
                else:
                    tokens, seconds = line.split()
                    result["wall"] = time.perf_counter() - result["start"]
                    phases.on = False
                    result["cpu"] = (thread_seconds(scheduler) - result["cpu"][0],
                                     thread_seconds(threading.main_thread()) - result["cpu"][1])
                    result["tokens/s"] = int(tokens) / float(seconds)
        os.kill(os.getpid(), signal.SIGTERM)  # the server drains and returns
    threading.Thread(target=drive, daemon=True).start()
    try:
        serve(engine, port=port, **({"loop": "asyncio", "http": "h11"}
                                    if args.pure_python_http else {}))
    finally:
        TextStream.add, scheduler_module.deliver = text_add, deliver
    if "wall" not in result:
        raise SystemExit("the client process failed; its error is above")
    return {**result, "phases": phases}


def print_run(name: str, result: dict) -> None:
    wall, phases = result["wall"], result["phases"]
    print(f"\n{name}: {result['tokens/s']:.0f} tokens/s over {wall:.2f} s")
    print("| phase | seconds | share of the wall time | calls | ms per call |")
    print("|---|---|---|---|---|")
    for phase, seconds in sorted(phases.seconds.items(), key=lambda item: -item[1]):
        calls = phases.calls[phase]
        print(f"| {phase} | {seconds:.3f} | {seconds / wall:.1%} | {calls} | "
              f"{1e3 * seconds / calls:.3f} |")
    scheduler, loop = result["cpu"]
    print(f"CPU time: scheduler thread {scheduler:.2f} s ({scheduler / wall:.0%} of the wall "
          f"time), event loop (main thread) {loop:.2f} s ({loop / wall:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="the compiled decoding step "
                        "(moekit serve --compile)")
    parser.add_argument("--threads", type=int,
                        help="torch threads for the forwards (default: what moekit serve picks)")
    parser.add_argument("--separate-prefill", action="store_true",
                        help="each prompt in a forward of its own (moekit serve "
                        "--separate-prefill)")
    parser.add_argument("--pure-python-http", action="store_true",
                        help="uvicorn on asyncio and h11 instead of uvloop and httptools")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("uvicorn.access").addFilter(lambda record: False)  # a line per request
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_checkpoint(folder)
        threads = args.threads or serving_threads("cpu") or torch.get_num_threads()
        kind = ("compiled" if args.compile else "eager") + (
            ", separate prefill" if args.separate_prefill else "") + (
            ", asyncio + h11" if args.pure_python_http else ", uvloop + httptools")
        print_run(f"{kind}, {threads} torch thread(s), {args.clients} streaming clients, "
                  f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                  measure(folder, args.compile, threads, args))


if __name__ == "__main__":
    main()
