#!/usr/bin/env python3
"""The decoding step alone, in variants side by side: milliseconds per step of moekit's
compiled step, with its kernels called from C++ (what ``DecodeStep(compile=True)`` makes) or
from Python, and with the mid-batch experts' path or the grouped one.

    python benchmarks/decode_step.py --dtype bf16 --batch 16
    python benchmarks/decode_step.py --dtype fp32 --batch 1 --variants cpp python eager

On the model of benchmarks/generate.py, after a prefill of random 32-token prompts, each
variant decodes ``--steps`` greedy tokens over the fixed-size cache; variants take turns in
each of ``--reps`` rounds, and the figure is the median time per step (no prefill, no
sampling beyond the argmax). Every variant's tokens are printed as the share equal to the
first variant's. Variants: ``cpp`` (inductor, kernels called from C++: the engine's compiled
step), ``python`` (inductor, its default Python wrapper), ``eager`` (``DecodeStep``
uncompiled), each with ``+grouped`` for the mid-batch experts' path off
(``moekit.moe.layer.DENSE_BATCH_ROWS = 0``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from generate import DTYPES, hf_mixtral, with_module_value
from moekit.convert.hf import transformer_from_hf
from moekit.model.decode_step import DecodeStep, StaticDecodeCache, cache_length
from moekit.model.generate import prefill
from moekit.moe import layer as moe_layer


def inductor_step(cpp_wrapper: bool):
    """A compiled step of its own (its own code object: torch.compile keeps graphs per
    function), with inductor's C++ or Python wrapper."""
    def step_logits(model, ids_B1, cache):
        return model(ids_B1, cache=cache).logits[:, -1]
    return torch.compile(step_logits, dynamic=False, options={"cpp_wrapper": cpp_wrapper})


def parse_variant(name: str) -> tuple[str, bool]:
    """(kind, grouped) of a variant's name, or exit naming what is allowed."""
    kind, *switches = name.split("+")
    if kind not in ("cpp", "python", "eager") or switches not in ([], ["grouped"]):
        raise SystemExit(f"unknown variant {name!r}: cpp, python or eager, each with an "
                         "optional +grouped")
    return kind, bool(switches)


def variant(name: str, model):
    kind, grouped = parse_variant(name)
    if kind == "cpp":
        run = DecodeStep(model, compile=True)
    elif kind == "python":
        compiled = inductor_step(cpp_wrapper=False)

        def run(ids_B1, cache):
            return compiled(model, ids_B1, cache)
    else:
        run = DecodeStep(model)
    return with_module_value(run, moe_layer, "DENSE_BATCH_ROWS", 0) if grouped else run


@torch.inference_mode()
def decode(model, prompts: list[list[int]], step, steps: int):
    """(milliseconds per step, tokens [steps, B]) after a fresh prefill."""
    logits_B1V, cache = prefill(model, prompts, cache_length(len(prompts[0]) + steps + 1,
                                                              model.config.max_seq_len))
    cache = StaticDecodeCache(cache, torch.full((len(prompts),), len(prompts[0])))
    next_B, tokens = logits_B1V[:, -1].argmax(-1), []
    start = time.perf_counter()
    for _ in range(steps):
        next_B = step(next_B[:, None], cache).argmax(-1)
        tokens.append(next_B)
    return (time.perf_counter() - start) / steps * 1e3, torch.stack(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["cpp", "python"])
    args = parser.parse_args()
    for name in args.variants:
        parse_variant(name)
    torch.set_num_threads(args.threads)
    model = transformer_from_hf(hf_mixtral(8000, 4)).eval().to(DTYPES[args.dtype])
    prompts = torch.randint(0, 8000, (args.batch, 32),
                            generator=torch.Generator().manual_seed(1)).tolist()
    steps = {name: variant(name, model) for name in args.variants}
    print(f"batch {args.batch}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    first = None
    for name, step in steps.items():  # compiles, and checks the tokens
        start = time.perf_counter()
        _, tokens = decode(model, prompts, step, args.steps)
        first = tokens if first is None else first
        print(f"{name:16} first run {time.perf_counter() - start:5.1f} s (compilation "
              f"included), tokens equal to {args.variants[0]}'s: "
              f"{(tokens == first).float().mean().item():.1%}", flush=True)
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(decode(model, prompts, step, args.steps)[0])
    for name in steps:
        print(f"{name:16} {statistics.median(times[name]):6.2f} ms per step "
              f"(median of {args.reps}; fastest {min(times[name]):.2f})")


if __name__ == "__main__":
    main()
