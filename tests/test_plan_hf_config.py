"""`moekit plan --hf-config` for every family moekit imports, against transformers itself:
parameters equal to the model transformers builds (on the meta device) from the config, the
KV cache per token equal to transformers' cache after a short forward of a tiny model, and
FLOPs and memory formed from those as docs/plan.md defines them."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.convert.families import FAMILIES  # noqa: E402

EXPERTS, TOP_K, VOCAB, TOKENS = 4, 2, 64, 5
# Small sizes under every family's key for them; a config class ignores the keys its family
# does not read.
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, num_local_experts=EXPERTS, num_experts=EXPERTS,
             num_experts_per_tok=TOP_K, moe_topk=TOP_K, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, tie_word_embeddings=False,
             n_routed_experts=EXPERTS, n_shared_experts=1, n_group=2, topk_group=1,
             first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=6)
# Multi-head latent attention has a key and a value per head, and its RoPE part is as wide as
# the shared RoPE key (transformers' DeepSeek-V3 reads head_dim as that width).
MLA_SMALL = dict(num_key_value_heads=SMALL["num_attention_heads"],
                 head_dim=SMALL["qk_rope_head_dim"])
# The registry's families that transformers has a class for (Hunyuan-Large's own layout,
# "hunyuan", shipped its modeling code with its checkpoints instead).
IN_TRANSFORMERS = [model_type for model_type in FAMILIES if model_type in CONFIG_MAPPING]


def _plan(capsys, path) -> dict:
    assert main(["plan", "--hf-config", str(path), "--json", "--kv-dtype", "fp32",
                 "--infer-dtype", "bf16"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_type", IN_TRANSFORMERS)
def test_plan_of_a_hugging_face_config_matches_transformers(tmp_path, capsys, model_type):
    mla = "mla" in FAMILIES[model_type].holds
    config = AutoConfig.for_model(model_type, **{**SMALL, **(MLA_SMALL if mla else {})})
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        parameters = dict(AutoModelForCausalLM.from_config(config).named_parameters())
    total = sum(p.numel() for p in parameters.values())
    # Stacked routed experts are the only 3-D weights: a token uses TOP_K of EXPERTS.
    routed = sum(p.numel() for p in parameters.values() if p.ndim == 3)
    assert routed or model_type not in [t for t, f in FAMILIES.items() if f.moe is not None]
    active = total - routed + routed * TOP_K // EXPERTS
    embeddings = 2 * VOCAB * SMALL["hidden_size"]  # untied: input and output matrices

    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (1, TOKENS)), use_cache=True).past_key_values
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) // TOKENS
    if mla:  # transformers caches the decompressed keys and values; moekit the latent and the
        # shared RoPE key, as DeepSeek's own inference does
        kv_bytes = 4 * SMALL["num_hidden_layers"] * (SMALL["kv_lora_rank"]
                                                     + SMALL["qk_rope_head_dim"])

    for path in (tmp_path, tmp_path / "config.json"):  # a folder, or the file itself
        plan = _plan(capsys, path)
        counts = plan["parameters"]
        assert (counts["total"], counts["active_with_embeddings"]) == (total, active)
        assert counts["active_without_embeddings"] == active - embeddings
        assert plan["kv_cache"]["variants"][[v["name"] for v in plan["kv_cache"]["variants"]]
                                            .index(plan["kv_cache"]["model_variant"])][
            "bytes_per_token"] == kv_bytes
        assert plan["flops_per_token"]["six_n"] == 6 * (active - embeddings)
        assert plan["inference_memory"][0]["weight_bytes"] == 2 * total  # bf16


def test_plan_refuses_what_import_refuses(tmp_path, capsys):
    AutoConfig.for_model("mixtral", **SMALL, mlp_bias=True).save_pretrained(tmp_path)
    assert main(["plan", "--hf-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("config.json: mlp_bias=True is not supported: moekit's "
                                     "FFNs have no bias") in err
