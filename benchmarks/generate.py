#!/usr/bin/env python3
"""Generation speed of moekit beside Hugging Face transformers' ``generate`` on the same model,
as ratios measured in one run.

    python benchmarks/generate.py                         # fp32, bf16 and quantized; batch 1, 16
    python benchmarks/generate.py --reps 5 --batches 1 4 16 --new-tokens 64

The model is a tiny Mixtral built by transformers from a config (H 512, F 1024, 8 experts top-2,
4 layers, GQA 8/2 heads, vocabulary 8000: 61M parameters, as in ../shared/docs/performance.md)
and imported into moekit with ``transformer_from_hf``, so both hold the same weights. Greedy,
random 32-token prompts, no end-of-text; tokens/s = batch * new tokens / the whole call
(prefill included). Before timing, both must produce the same tokens in fp32, and every
engine is warmed up once. Engines take turns within each repetition; figures are medians. The quantized rows run moekit with
weight-only quantized experts and attention (compute in bf16) against HF in bf16.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from moekit.convert.hf import transformer_from_hf
from moekit.model import generate
from moekit.quant import quantize_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_mixtral(vocab: int, layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM
    config = MixtralConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1024,
                           num_hidden_layers=layers, num_attention_heads=8,
                           num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # HF leaves the stacked expert weights uninitialised
        for name, weight in model.named_parameters():
            if "experts" in name:
                weight.normal_(0, 0.02)
    return model


def hf_generate(model, prompts_BS: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(prompts_BS, attention_mask=torch.ones_like(prompts_BS),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[:, prompts_BS.shape[1]:]


def moekit_generate(model, prompts_BS: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return torch.tensor(generate(model, prompts_BS.tolist(), new_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", nargs="*", default=["fp8", "int8"], choices=["fp8", "int8"],
                        help="weight-only quantized moekit rows (bf16 compute)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 8000
    hf = hf_mixtral(vocab, args.layers)
    ours = transformer_from_hf(hf).eval()
    print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    generator = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_tokens), generator=generator)
               for b in args.batches}

    check = prompts[max(args.batches)]
    same = torch.equal(hf_generate(hf, check, 16), moekit_generate(ours, check, 16))
    print(f"fp32 greedy tokens identical (batch {len(check)}, 16 tokens): {same}")
    if not same:
        raise SystemExit("moekit and transformers disagree in fp32: fix that before timing")

    engines = {}  # (label, dtype name) -> (generate function, model)
    for name, dtype in DTYPES.items():
        engines[("transformers", name)] = (hf_generate, copy.deepcopy(hf).to(dtype))
        engines[("moekit", name)] = (moekit_generate, copy.deepcopy(ours).to(dtype))
    for quant in args.quant:
        quantized = quantize_model(copy.deepcopy(ours).to(torch.bfloat16), experts=quant,
                                   attention=quant)
        engines[(f"moekit {quant}", "bf16")] = (moekit_generate, quantized)

    for batch in args.batches:  # warm-up: first calls of a shape pay one-off costs
        for run, model in engines.values():
            run(model, prompts[batch], 4)
    times = {(key, b): [] for key in engines for b in args.batches}
    for rep in range(args.reps):
        print(f"repetition {rep + 1} of {args.reps}", flush=True)
        for batch in args.batches:
            for key, (run, model) in engines.items():
                start = time.perf_counter()
                run(model, prompts[batch], args.new_tokens)
                times[key, batch].append(time.perf_counter() - start)

    print(f"\ntokens/s (batch x {args.new_tokens} new tokens / median seconds of "
          f"{args.reps}), and the ratio to transformers in the same dtype")
    print(f"{'engine':22} {'dtype':5} " + " ".join(f"{'batch ' + str(b):>20}"
                                                   for b in args.batches))
    for (label, dtype) in engines:
        cells = []
        for batch in args.batches:
            rate = batch * args.new_tokens / statistics.median(times[(label, dtype), batch])
            peer = batch * args.new_tokens / statistics.median(
                times[("transformers", dtype), batch])
            cells.append(f"{rate:10.0f} ({rate / peer:5.2f}x)")
        print(f"{label:22} {dtype:5} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
