"""Experts beyond memory (``--expert-memory``): the routed experts stay in the checkpoint file
and an LRU cache of them within a byte budget is in memory. References: the same checkpoint
fully resident (greedy tokens), /proc/self/status's RssAnon measured in a fresh process (the
budget), the hand count of one expert's bytes (the cache's counters)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from prometheus_client import generate_latest

from moekit.cli import main
from moekit.config import preset
from moekit.model import Transformer, generate, save_model
from moekit.parallel import expert_cache, load_for_serving
from moekit.quant import load_for_inference, quantize_model, save_quantized
from moekit.serve import Engine, Sampling
from moekit.train.tokenizer import train_tokenizer

BASE = preset("tiny")
# Experts are most of this model: 4 layers x 8 experts of 3 * 256 * 512 float32 = 1.5 MiB each.
CONFIG = replace(BASE, vocab_size=257, hidden_size=256, max_seq_len=64,
                 moe=replace(BASE.moe, hidden_size=256, ffn_size=512))
EXPERT_BYTES = 3 * 256 * 512 * 4
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]]
# What RssAnon may grow past the budget and the resident weights (measured beyond the budget:
# 0.65 MiB: activations, the KV cache, torch's small allocations).
MARGIN_BYTES = 4 << 20


SMALL = replace(BASE, vocab_size=257)  # experts of 3 x 128 x 128 float32: 192 KiB each
SMALL_EXPERT_BYTES = 3 * 128 * 128 * 4


def _saved(folder, config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_model(model, folder)
    train_tokenizer([], 257).save(folder)  # byte-level: any text, no download
    return folder, model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("offload") / "small", SMALL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("offload") / "model", CONFIG)


# Run in a fresh process: RssAnon is the process's. The baseline is taken once torch has loaded
# its meta-device kernels (Python modules, ~70 MB, that building the unloaded model needs once).
MEASURE = """
import json, sys, torch
from moekit.devices import anonymous_resident_bytes as anon
from moekit.model import generate
from moekit.parallel import expert_cache, load_for_serving
from moekit.quant import load_for_inference
torch.empty(1, device="meta").normal_()
folder, budget, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
start = anon()
peak = [start]
model = load_for_serving(folder, "cpu", budget)
for block in model.layers.values():
    block.register_forward_hook(lambda *args: peak.append(anon()))
with torch.inference_mode():
    tokens = generate(model, prompts, 10)
cache = expert_cache(model)
offloaded = max(peak) - start
before = anon()
with torch.inference_mode():
    resident = load_for_inference(folder)
print(json.dumps({"tokens": tokens, "growth": offloaded, "resident_growth": anon() - before,
                  "hits": cache.hits, "misses": cache.misses, "loaded": cache.bytes_loaded,
                  "slots": cache.num_slots}))
"""


def test_experts_four_times_the_budget_give_the_resident_tokens_within_the_budget(checkpoint):
    folder, model = checkpoint
    experts_bytes = sum(p.numel() * 4 for name, p in model.named_parameters()
                        if ".experts." in name)
    assert experts_bytes == 4 * 8 * EXPERT_BYTES
    budget = experts_bytes // 4
    resident_bytes = sum(p.numel() * 4 for name, p in model.named_parameters()
                         if ".experts." not in name)
    expected = generate(model, PROMPTS, 10)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(budget),
                             json.dumps(PROMPTS)], capture_output=True, text=True, timeout=120,
                            check=True)
    measured = json.loads(result.stdout)
    assert measured["tokens"] == expected
    assert measured["slots"] == 8  # budget // one expert
    assert measured["misses"] > 8 and measured["loaded"] == measured["misses"] * EXPERT_BYTES
    assert measured["growth"] <= budget + resident_bytes + MARGIN_BYTES, measured
    # The measurement sees expert memory: the same checkpoint resident grows by all experts.
    assert measured["resident_growth"] >= experts_bytes, measured


def test_cache_keeps_the_most_recently_used_experts(small):
    folder, resident = small
    model = load_for_serving(folder, "cpu", 2 * SMALL_EXPERT_BYTES + 1)  # two slots
    cache = expert_cache(model)
    for expert in (0, 1, 0, 2, 0, 1):  # 0 is used again before each eviction, 1 is not
        cache.expert("layers.0.ffn.experts", expert)
    # misses: 0, 1, 2 (evicts 1, the least recently used), 1 (evicts 2); hits: 0, 0
    assert (cache.hits, cache.misses) == (2, 4)
    gate_up = cache.expert("layers.0.ffn.experts", 0)["gate_up_proj"]
    assert cache.hits == 3
    stored = resident.layers[0].ffn.experts.gate_up_proj[0:1]
    assert torch.equal(gate_up, stored)


def test_bf16_checkpoint_offloaded_keeps_bf16_experts(tmp_path):
    torch.manual_seed(0)
    model = Transformer(SMALL).eval().to(torch.bfloat16)
    save_model(model, tmp_path / "bf16")
    offloaded = load_for_serving(tmp_path / "bf16", "cpu", 4 * SMALL_EXPERT_BYTES // 2)
    assert generate(offloaded, PROMPTS, 6) == generate(model, PROMPTS, 6)
    cache = expert_cache(offloaded)
    assert cache.num_slots == 4 and cache.slots["gate_up_proj"].dtype == torch.bfloat16


def test_quantized_checkpoint_offloaded_gives_its_resident_tokens_and_metrics(tmp_path):
    torch.manual_seed(0)
    quantized = quantize_model(Transformer(SMALL).eval(), experts="int8", attention=None)
    save_quantized(quantized, tmp_path / "q")
    expected = generate(load_for_inference(tmp_path / "q"), PROMPTS, 8)
    expert_bytes = 3 * 128 * 128 + 3 * 128 * 4  # int8 weights, a float32 scale per output row
    offloaded = load_for_serving(tmp_path / "q", "cpu", 3 * expert_bytes)
    assert generate(offloaded, PROMPTS, 8) == expected
    cache = expert_cache(offloaded)
    assert (cache.num_slots, cache.expert_bytes) == (3, expert_bytes)
    tokenizer = train_tokenizer([], 257)
    engine = Engine(offloaded, tokenizer, "q", max_tokens_limit=8)
    try:
        pieces, _ = engine.complete(["Hello"], Sampling(max_tokens=8, temperature=0))
        served = "".join(piece.text for piece in pieces)
        text = generate_latest(engine.metrics.registry).decode()
    finally:
        engine.close()
    resident = generate(load_for_inference(tmp_path / "q"), [tokenizer.encode("Hello")], 8,
                        eos_id=tokenizer.eos_id)[0]
    assert served == tokenizer.decode(resident)
    exported = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("moekit_expert_cache_")}
    assert exported["moekit_expert_cache_misses_total"] == cache.misses > 0
    assert exported["moekit_expert_cache_hits_total"] == cache.hits
    assert exported["moekit_expert_cache_loaded_bytes_total"] == cache.bytes_loaded


def test_generate_cli_offloaded_prints_the_resident_text(small, capsys):
    folder, _ = small
    command = ["generate", "--checkpoint", str(folder), "--prompt", "Hello", "--temperature",
               "0", "--max-new-tokens", "6"]
    assert main(command) == 0
    resident = capsys.readouterr().out
    assert main([*command, "--expert-memory", "400KiB"]) == 0  # 2 experts of 192 KiB
    assert capsys.readouterr().out == resident
    assert main([*command, "--expert-memory", "100KB"]) == 2
    error = capsys.readouterr().err
    assert "--expert-memory 100,000 bytes holds no expert" in error and error.count("\n") == 1
