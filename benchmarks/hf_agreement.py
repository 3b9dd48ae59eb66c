"""How closely imported Hugging Face models agree with transformers, family by family.

For each family: a random model built by transformers (4 layers, D 256, 8 experts), written by
``save_pretrained``, imported with ``moekit.convert.load_hf``; printed are the largest logit
difference on 4 x 128 tokens (fp32), whether 16 greedy tokens are the same, and the same
difference for ``export_hf`` back to the family's layout loaded by ``from_pretrained``.
Nothing is downloaded. The table in docs/convert.md comes from
``python benchmarks/hf_agreement.py``.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from moekit.convert import export_hf, load_hf
from moekit.model import generate

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, intermediate_size=512, max_position_embeddings=256)
DEEPSEEK_MOE = dict(moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                    n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                    first_k_dense_replace=1)
DEEPSEEK = dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                **DEEPSEEK_MOE, **{**COMMON, "num_key_value_heads": 8})
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=8, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=8, num_experts_per_tok=2, **COMMON),
    "hunyuan_v1_moe": lambda: transformers.HunYuanMoEV1Config(num_experts=8, moe_topk=2,
                                                              head_dim=32, **COMMON),
    # IBM's PowerMoE-3b scalings.
    "granitemoe": lambda: transformers.GraniteMoeConfig(
        num_local_experts=8, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, logits_scaling=6.0, **COMMON),
    "granitemoeshared": lambda: transformers.GraniteMoeSharedConfig(
        num_local_experts=8, shared_intermediate_size=256, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0, **COMMON),
    # Scaled RoPE and attention biases (q, k, v and o_proj) on Llama; 128 positions run past
    # the original contexts these scalings name.
    **{f"llama, {kind} RoPE": (lambda parameters=parameters: transformers.LlamaConfig(
        attention_bias=True, rope_parameters={**parameters, "rope_theta": 1e4}, **{
            **COMMON, "max_position_embeddings": 64 if kind == "dynamic" else 256}))
       for kind, parameters in {
           "linear": {"rope_type": "linear", "factor": 4.0},
           "dynamic": {"rope_type": "dynamic", "factor": 4.0},
           "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
           "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
       }.items()},
    "mistral, sliding window 32": lambda: transformers.MistralConfig(sliding_window=32,
                                                                     **COMMON),
    "qwen3_moe, mlp_only_layers [0, 2]": lambda: transformers.Qwen3MoeConfig(
        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0, 2],
        **COMMON),
    # Multi-head latent attention, group-limited routing (4 groups of 2 experts, the best 2
    # eligible), 2.5 x the routed output, a shared expert, the first layer dense.
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        q_lora_rank=None, topk_method="group_limited_greedy", **DEEPSEEK),
    # With DeepSeek-V3's YaRN settings (their softmax mscale included), 128 positions past
    # the original 64.
    "deepseek_v3, YaRN": lambda: transformers.DeepseekV3Config(
        q_lora_rank=96, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "original_max_position_embeddings": 64}, **DEEPSEEK),
    # DeepSeek-V3's architecture with GLM's per-layer list of dense layers.
    "glm4_moe_lite": lambda: transformers.Glm4MoeLiteConfig(
        q_lora_rank=96, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        **{key: value for key, value in DEEPSEEK.items() if key != "first_k_dense_replace"}),
    # Partial RoPE (half of each head), QK-norm, q/k/v biases, sigmoid routing in groups.
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        use_qk_norm=True, attention_bias=True, head_dim=32,
        **{**DEEPSEEK_MOE, **COMMON}),
}


def _random_model(config):
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers leaves stacked expert weights uninitialised
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.normal_(0, 0.05)
        for name, bias in model.named_buffers():  # DeepSeek-V3's and GLM's, zero at first
            if name.endswith("e_score_correction_bias"):
                bias.normal_(0, 0.05)
    return model


def _greedy(hf_model, ids, new_tokens):
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def measure(family: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    hf_model = _random_model(FAMILIES[family]())
    ids = torch.randint(0, VOCAB, (4, 128))
    expected = hf_model(ids).logits
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        model = load_hf(folder)
    imported = (model(ids).logits - expected).abs().max().item()
    same_tokens = generate(model, ids[:, :16].tolist(), 16) == _greedy(hf_model, ids[:, :16], 16)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, folder, hf_model.config.model_type)
        exported = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        back = (exported(ids).logits - model(ids).logits).abs().max().item()
    return (f"{family}: import max |logit diff| {imported:.1e} (logit std "
            f"{expected.std().item():.2f}); greedy tokens same: {same_tokens}; "
            f"export then from_pretrained: {back:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, action="append",
                        help="one family (repeatable); default all")
    args = parser.parse_args()
    for family in args.family or FAMILIES:
        print(measure(family), flush=True)


if __name__ == "__main__":
    main()
