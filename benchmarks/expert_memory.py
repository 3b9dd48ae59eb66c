#!/usr/bin/env python3
"""Experts beyond memory (``--expert-memory``): memory and decoding speed of a model served with
its routed experts offloaded, beside the same model fully resident, measured in one run.

    python benchmarks/expert_memory.py                      # experts 4x the budget
    python benchmarks/expert_memory.py --budget-share 0.5 --new-tokens 64

A model is built (H 512, expert FFN 1024, 8 experts top-2, 4 layers, vocabulary 8000 by
default: 201 MB of float32 experts), saved, and generated from greedily in a fresh process per
mode (resident; offloaded with a budget of ``--budget-share`` of the experts), so that each
process's anonymous resident memory (RssAnon) is its own. Printed per mode: RssAnon growth from
the start of loading to its peak during generation (sampled after every layer), the expert
bytes the mode holds (all experts, or the budget) and the growth beyond them, decode tokens/s
and its ratio to resident, and the cache's hits, misses and bytes loaded. (Offloaded on a CPU,
the resident part, here 41 MiB, is read by safetensors from the mapped file: file pages, not
RssAnon.) Both modes must give
the same tokens. The baseline is taken once torch has loaded its meta-device kernels, which
building the unloaded model needs once (about 70 MB of Python modules).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from moekit.config import preset
from moekit.devices import anonymous_resident_bytes
from moekit.model import Transformer, generate, save_model
from moekit.parallel import expert_cache, load_for_serving

MIB = 2 ** 20


def child(folder: str, budget: int | None, new_tokens: int) -> dict:
    """One mode, in this (fresh) process."""
    torch.set_num_threads(1)
    torch.empty(1, device="meta").normal_()
    start = anonymous_resident_bytes()
    peak = [start]
    model = load_for_serving(folder, "cpu", budget)
    for block in model.layers.values():
        block.register_forward_hook(lambda *args: peak.append(anonymous_resident_bytes()))
    prompts = [[(7 * i) % 8000 + 1 for i in range(32)]]
    with torch.inference_mode():
        generate(model, prompts, 2)  # warm-up
        began = time.perf_counter()
        tokens = generate(model, prompts, new_tokens)
        seconds = time.perf_counter() - began
    cache = expert_cache(model)
    figures = {"tokens": tokens, "growth": max(peak) - start,
               "tokens_per_s": new_tokens / seconds}
    if cache is not None:
        figures |= {"hits": cache.hits, "misses": cache.misses, "loaded": cache.bytes_loaded,
                    "slots": cache.num_slots, "expert_bytes": cache.expert_bytes}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-share", type=float, default=0.25,
                        help="the budget as a share of all experts' bytes (default 0.25)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, budget = args.child
        print(json.dumps(child(folder, None if budget == "none" else int(budget),
                               args.new_tokens)))
        return
    base = preset("tiny")
    config = replace(base, vocab_size=8000, hidden_size=512, num_heads=8, num_kv_heads=2,
                     max_seq_len=256, moe=replace(base.moe, hidden_size=512, ffn_size=1024))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    experts = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if ".experts." in name)
    resident = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                   if ".experts." not in name)
    budget = int(experts * args.budget_share)
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        del model
        runs = {mode: json.loads(subprocess.run(
            [sys.executable, __file__, "--child", folder, str(value), "--new-tokens",
             str(args.new_tokens)], capture_output=True, text=True, check=True).stdout)
            for mode, value in (("resident", "none"), ("offloaded", budget))}
    if runs["resident"]["tokens"] != runs["offloaded"]["tokens"]:
        raise SystemExit("the offloaded model gave other tokens than the resident one")
    print(f"experts {experts / MIB:.1f} MiB, the rest {resident / MIB:.1f} MiB; budget "
          f"{budget / MIB:.1f} MiB ({args.budget_share:g} of the experts); "
          f"{args.new_tokens} new tokens, batch 1, 1 thread, same tokens: yes")
    print(f"{'mode':<10} {'RssAnon growth':>15} {'experts held':>13} {'beyond them':>12} "
          f"{'tokens/s':>9} {'vs resident':>11} {'hits':>6} {'misses':>7} {'loaded':>10}")
    for mode, run in runs.items():
        held = experts if mode == "resident" else budget
        cache = (f"{run['hits']:>6} {run['misses']:>7} {run['loaded'] / MIB:>6.1f} MiB"
                 if mode == "offloaded" else "")
        print(f"{mode:<10} {run['growth'] / MIB:>11.1f} MiB {held / MIB:>9.1f} MiB "
              f"{(run['growth'] - held) / MIB:>8.1f} MiB {run['tokens_per_s']:>9.1f} "
              f"{run['tokens_per_s'] / runs['resident']['tokens_per_s']:>11.2f} {cache}")

if __name__ == "__main__":
    main()
