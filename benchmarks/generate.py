#!/usr/bin/env python3
"""Generation speed of moekit beside Hugging Face transformers' ``generate`` and llama.cpp on the
same model, as ratios measured in one run.

    python benchmarks/generate.py                         # fp32 and bf16; batch 1, 16
    python benchmarks/generate.py --reps 5 --batches 1 4 16 --new-tokens 64 --quant int8
    python benchmarks/generate.py --no-compile --grouped-row     # what the mid-batch path gives
    python benchmarks/generate.py --batches 1 --dtypes bf16 --plain-rows   # what torch.mv gives
    python benchmarks/generate.py --batches 16 --packed       # on weights packed for decoding

The model is a tiny Mixtral built by transformers from a config (H 512, F 1024, 8 experts top-2,
4 layers, GQA 8/2 heads, vocabulary 8000: 61M parameters, as in ../shared/docs/performance.md)
and imported into moekit with ``transformer_from_hf``, so both hold the same weights. Greedy,
random 32-token prompts, no end-of-text; tokens/s = batch * new tokens / the whole call
(prefill included). moekit runs eagerly and with its decoding step compiled (``--compile``;
the compilation is done and timed before the runs, once per batch size, as a server start pays
it). llama.cpp gets the GGUF its own converter makes from ``moekit export --layout mixtral``
(``benchmarks/llama_cpp_engine.py``; the column is left out, with the reason, where
llama-cpp-python or the converter is missing); llama-cpp-python decodes one sequence at a
time, so its batch of 16 is 16 generations one after another. Before timing, every engine
must agree with transformers' tokens (moekit exactly in fp32; the agreement is printed
for every engine), and every engine is
warmed up once. Engines take turns within each repetition; figures are medians. The quantized
rows run moekit with weight-only quantized experts and attention (compute in bf16) against HF
in bf16. ``--grouped-row`` adds eager moekit rows with the mid-batch experts' path off
(``moekit.moe.layer.DENSE_BATCH_ROWS = 0``), so that its effect is measured in the same run;
``--plain-rows`` likewise adds an eager moekit row whose one-row bf16 products run as
``F.linear`` instead of ``torch.mv`` (``moekit.moe.row_products``; compiled steps always use
``F.linear``). ``--packed`` adds moekit rows (eager, and compiled unless ``--no-compile``) on a
copy of the model whose weights are packed for decoding (``moekit.model.packed``, packed for the
largest batch; ``benchmarks/packed_products.py`` measures the products and their memory).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import llama_cpp_engine
from moekit.convert.hf import transformer_from_hf
from moekit.convert.hf_folder import export_hf
from moekit.model import generate
from moekit.model.decode_step import DecodeStep
from moekit.model.packed import pack_for_decoding
from moekit.moe import layer as moe_layer
from moekit.moe import row_products
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


def moekit_generate(model, step=None):
    return lambda prompts_BS, new_tokens: torch.tensor(
        generate(model, prompts_BS.tolist(), new_tokens, step=step))


def with_module_value(run, module, name: str, value):
    """``run`` with ``module.name`` set to ``value`` while it runs (a path switched off)."""
    def patched_run(*args):
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return run(*args)
        finally:
            setattr(module, name, saved)
    return patched_run


def llama_cpp_engines(ours, dtypes, threads: int, folder: Path) -> dict:
    """llama.cpp on the GGUF of each dtype, or nothing (with the reason printed)."""
    reason = llama_cpp_engine.missing()
    if reason is not None:
        print(f"llama.cpp left out: {reason}")
        return {}
    export_hf(ours, folder / "exported", "mixtral")
    engines = {}
    for name in dtypes:
        model = llama_cpp_engine.LlamaCpp(
            llama_cpp_engine.write_gguf(folder / "exported", folder / f"{name}.gguf", name),
            threads)
        engines[("llama.cpp", name)] = lambda prompts_BS, new_tokens, model=model: \
            torch.tensor(model.generate(prompts_BS.tolist(), new_tokens))
    return engines


def check_tokens(engines: dict, prompts_BS: torch.Tensor, new_tokens: int) -> None:
    """Every engine's greedy tokens beside transformers' in the same dtype, as the share that
    agree and the first step where a row differs. moekit's fp32 rows must agree exactly (the
    same products in the same order); llama.cpp rounds in another order, and a near-tie in
    this random model's logits may then go the other way, after which the row diverges."""
    expected = {dtype: run(prompts_BS, new_tokens) for (label, dtype), run in engines.items()
                if label == "transformers"}
    for (label, dtype), run in engines.items():
        if label == "transformers":
            continue
        same_BN = run(prompts_BS, new_tokens) == expected[dtype]
        differs = (~same_BN).any(0).nonzero()
        first = "none" if len(differs) == 0 else int(differs[0]) + 1
        print(f"{label:24} {dtype}: {same_BN.float().mean().item():6.1%} of transformers' "
              f"greedy tokens (batch {len(prompts_BS)}, {new_tokens} tokens; first step "
              f"that differs: {first})", flush=True)
        if dtype == "fp32" and label.startswith("moekit") and not same_BN.all():
            raise SystemExit(f"{label} and transformers disagree in fp32: fix that first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out moekit's compiled rows (their compilation takes "
                        "minutes on 2 cores)")
    parser.add_argument("--grouped-row", action="store_true",
                        help="also time eager moekit with the mid-batch experts' path off")
    parser.add_argument("--quant", nargs="*", default=[], choices=["fp8", "int8"],
                        help="weight-only quantized moekit rows (bf16 compute)")
    parser.add_argument("--plain-rows", action="store_true",
                        help="also moekit rows with one-row bf16 products as F.linear")
    parser.add_argument("--packed", action="store_true",
                        help="also moekit rows on weights packed for decoding "
                        "(moekit.model.packed), eager and compiled")
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

    engines = {}  # (label, dtype name) -> run(prompts_BS, new_tokens) -> tokens_BN
    for name in args.dtypes:
        hf_copy = copy.deepcopy(hf).to(DTYPES[name])
        ours_copy = copy.deepcopy(ours).to(DTYPES[name])
        engines[("transformers", name)] = lambda p, n, model=hf_copy: hf_generate(model, p, n)
        engines[("moekit", name)] = moekit_generate(ours_copy)
        if args.grouped_row:
            engines[("moekit, grouped experts", name)] = with_module_value(
                moekit_generate(ours_copy), moe_layer, "DENSE_BATCH_ROWS", 0)
        if args.plain_rows:
            engines[("moekit, plain rows", name)] = with_module_value(
                moekit_generate(ours_copy), row_products, "ROW_PRODUCT_DTYPES", ())
        if args.compile:
            engines[("moekit --compile", name)] = compiled_generate(ours_copy, name, args)
        if args.packed:
            packed = pack_for_decoding(copy.deepcopy(ours_copy), max(args.batches))
            engines[("moekit packed", name)] = moekit_generate(packed)
            if args.compile:
                engines[("moekit packed --compile", name)] = compiled_generate(
                    packed, f"packed {name}", args)
    for quant in args.quant:
        quantized = quantize_model(copy.deepcopy(ours).to(torch.bfloat16), experts=quant,
                                   attention=quant)
        engines[(f"moekit {quant}", "bf16")] = moekit_generate(quantized)
    with tempfile.TemporaryDirectory() as scratch:
        engines.update(llama_cpp_engines(ours, args.dtypes, args.threads, Path(scratch)))
        check_tokens(engines, prompts[max(args.batches)], args.new_tokens)
        time_engines(engines, prompts, args)


def compiled_generate(model, name: str, args):
    """moekit's generate with a decoding step compiled (and timed) for every batch size."""
    step = DecodeStep(model, compile=True)
    for batch in args.batches:
        seconds = step.prepare(batch, args.prompt_tokens + args.new_tokens)
        print(f"moekit --compile {name}, batch {batch}: compiled in {seconds:.0f} s", flush=True)
    return moekit_generate(model, step)


def time_engines(engines: dict, prompts: dict, args) -> None:
    times = {(key, b): [] for key in engines for b in args.batches}
    for batch in args.batches:  # warm-up: first calls of a shape pay one-off costs
        for run in engines.values():
            run(prompts[batch], args.new_tokens)
    for rep in range(args.reps):
        print(f"repetition {rep + 1} of {args.reps}", flush=True)
        for batch in args.batches:
            for key, run in engines.items():
                start = time.perf_counter()
                run(prompts[batch], args.new_tokens)
                times[key, batch].append(time.perf_counter() - start)

    print(f"\ntokens/s (batch x {args.new_tokens} new tokens / median seconds of "
          f"{args.reps}), and the ratio to transformers in the same dtype")
    print(f"{'engine':24} {'dtype':5} " + " ".join(f"{'batch ' + str(b):>20}"
                                                   for b in args.batches))
    for (label, dtype) in engines:
        cells = []
        for batch in args.batches:
            rate = batch * args.new_tokens / statistics.median(times[(label, dtype), batch])
            peer = batch * args.new_tokens / statistics.median(
                times[("transformers", dtype), batch])
            cells.append(f"{rate:10.0f} ({rate / peer:5.2f}x)")
        print(f"{label:24} {dtype:5} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
