#!/usr/bin/env python3
"""Decoding with multi-head latent attention: the absorbed path (attention over the cached
latent, ``LatentAttention.absorb``) beside expanding the cached latent into every head's keys
and values at each step, and beside transformers' DeepSeek-V3 decoding (which expands), as
ratios measured in one run.

    python benchmarks/mla_decode.py                      # 1,024 cached positions
    python benchmarks/mla_decode.py --past 256 2048 --reps 5

The model is a DeepSeek-V3 built by transformers from a config (D 1024, 16 heads, latent 256,
query latent 384, heads of 64 + 32 and values of 64, 2 layers, the second MoE with 8 experts
top-2), imported with ``transformer_from_hf``. A batch of 4 prompts of ``past`` tokens is
prefilled, then 16 greedy steps are timed (ms per step, median over reps, the paths taking
turns). Before timing, all three must give the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.convert.hf import transformer_from_hf
from moekit.model.transformer import LatentAttention

STEPS = 16


def hf_deepseek(context: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    config = DeepseekV3Config(
        vocab_size=4096, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, intermediate_size=2048, moe_intermediate_size=512,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=context)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # transformers leaves the stacked expert weights uninitialised
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.normal_(0, 0.02)
    return model


@torch.inference_mode()
def moekit_steps(model, ids, absorb: bool):
    """Per-step seconds of STEPS greedy steps after the prompt, and the tokens."""
    LatentAttention.absorb = absorb
    try:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + STEPS)
        token = model(ids, cache=cache, last_only=True).logits[:, -1].argmax(-1)
        tokens, start = [token], time.perf_counter()
        for _ in range(STEPS - 1):
            token = model(token[:, None], cache=cache).logits[:, -1].argmax(-1)
            tokens.append(token)
        return (time.perf_counter() - start) / (STEPS - 1), torch.stack(tokens, 1)
    finally:
        LatentAttention.absorb = True


@torch.inference_mode()
def hf_steps(hf_model, ids):
    out = hf_model(ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1].argmax(-1)
    tokens, start = [token], time.perf_counter()
    for _ in range(STEPS - 1):
        out = hf_model(token[:, None], cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1)
        tokens.append(token)
    return (time.perf_counter() - start) / (STEPS - 1), torch.stack(tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--past", type=int, nargs="+", default=[1024],
                        help="cached positions before the timed steps")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    hf_model = hf_deepseek(max(args.past) + STEPS)
    model = transformer_from_hf(hf_model).eval()
    for past in args.past:
        ids = torch.randint(0, 4096, (4, past))
        engines = {"absorbed": lambda: moekit_steps(model, ids, True),
                   "expanded": lambda: moekit_steps(model, ids, False),
                   "transformers": lambda: hf_steps(hf_model, ids)}
        tokens = {name: run()[1] for name, run in engines.items()}  # warm-up and check
        if not all(torch.equal(t, tokens["transformers"]) for t in tokens.values()):
            raise SystemExit(f"past {past}: the paths disagree on the greedy tokens")
        times = {name: [] for name in engines}
        for _ in range(args.reps):
            for name, run in engines.items():
                times[name].append(run()[0])
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        print(f"past {past}, batch 4: ms per step absorbed {ms['absorbed']:.1f}, expanded "
              f"{ms['expanded']:.1f}, transformers {ms['transformers']:.1f}; expanded / "
              f"absorbed {ms['expanded'] / ms['absorbed']:.2f}, transformers / absorbed "
              f"{ms['transformers'] / ms['absorbed']:.2f}", flush=True)


if __name__ == "__main__":
    main()
