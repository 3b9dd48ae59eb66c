"""DeepSeek-V2, DeepSeek-V3, GLM4-MoE-Lite and GLM4-MoE folders, both ways, against transformers: a folder
transformers saved (fp32; bf16 in shards) imports with its logits and greedy tokens; the export
loads with AutoModelForCausalLM and gives them again, in the very tensors of the source files
(DeepSeek's interleaved RoPE rows put back)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_checks import assert_left_padded_logits_equal  # noqa: E402
from moekit.config import MLAConfig, ModelConfig, MoEConfig  # noqa: E402
from moekit.convert import export_hf, load_hf  # noqa: E402
from moekit.files import CheckpointError  # noqa: E402
from moekit.model import Transformer, generate  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
              num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
              n_shared_experts=2, routed_scaling_factor=2.5)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           num_key_value_heads=4)
# DeepSeek-V3's own YaRN settings, at a tiny scale: frequencies, attention factor and the
# softmax's mscale all matter.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16}
CONFIGS = {
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        **MLA, **COMMON),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        q_lora_rank=12, n_group=4, topk_group=2, rope_parameters=YARN, **MLA, **COMMON),
    "glm4_moe_lite": lambda: transformers.Glm4MoeLiteConfig(
        q_lora_rank=12, n_group=4, topk_group=2, mlp_layer_types=["sparse", "dense", "sparse"],
        **MLA, **{key: value for key, value in COMMON.items() if key != "first_k_dense_replace"}),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        num_key_value_heads=2, head_dim=8, use_qk_norm=True, attention_bias=True, n_group=2,
        topk_group=1, **COMMON),
}


def _saved(folder, family, **save):
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    with torch.no_grad():  # transformers leaves experts uninitialised, the bias at zero
        for name, parameter in hf_model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.2)
        for name, buffer in hf_model.named_buffers():
            if "e_score_correction_bias" in name:
                buffer.normal_(0, 0.1)
    hf_model.save_pretrained(folder, **save)
    return hf_model


def _greedy(hf_model, ids, new_tokens):
    hf_model.generation_config.eos_token_id = None
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", list(CONFIGS))
@torch.no_grad()
def test_import_and_export_agree_with_transformers(tmp_path, family):
    hf_model = _saved(tmp_path / "hf", family)
    ids = torch.randint(0, VOCAB, (2, 13))
    expected = hf_model(ids).logits
    model = load_hf(tmp_path / "hf")
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert generate(model, ids[:, :5].tolist(), 8) == _greedy(hf_model, ids[:, :5], 8)
    assert_left_padded_logits_equal(model, hf_model, ids)

    export_hf(model, tmp_path / "back", family)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(exported(ids).logits, expected, rtol=1e-4, atol=1e-5)
    source = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(tmp_path / "back" / "model.safetensors")
    assert written.keys() == source.keys()
    assert all(torch.equal(written[name], source[name]) for name in source)

    # bf16, in shards: read in fp32, as transformers reads it in fp32.
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16",
                                                     dtype=torch.float32).eval()
    torch.testing.assert_close(load_hf(tmp_path / "bf16", torch.float32)(ids).logits,
                               reference(ids).logits, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_deepseek_v3_without_interleaved_rope_and_prediction_layers_left_out(tmp_path):
    """rope_interleave=False keeps the rows as they are; a multi-token-prediction layer
    (numbered num_hidden_layers) in the files is left out, as transformers leaves it."""
    config = transformers.DeepseekV3Config(q_lora_rank=12, n_group=4, topk_group=2,
                                           rope_interleave=False, **MLA, **COMMON)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.2)
    hf_model.save_pretrained(tmp_path / "hf")
    files = load_file(tmp_path / "hf" / "model.safetensors")
    files["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    from safetensors.torch import save_file
    save_file(files, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, hf_model(ids).logits,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc' is not supported: transformers' "
                                  "DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy'"),
    ({"attention_bias": True}, "attention_bias=True is not supported: moekit's latent "
                               "attention has no biases"),
])
def test_import_refuses_what_moekit_cannot_hold(tmp_path, change, message):
    _saved(tmp_path / "hf", "deepseek_v2")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path / "hf")


def _mla_model(**moe):
    return Transformer(ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, ffn_size=48,
        mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, num_shared_experts=1,
                      **{"normalize_weights": False, **moe})))


@pytest.mark.parametrize("model, layout, message", [
    (lambda: _mla_model(), "mixtral", "cannot hold multi-head latent attention"),
    (lambda: _mla_model(), "deepseek_v3", "cannot hold the softmax or switch router"),
    (lambda: _mla_model(router="sigmoid"), "deepseek_v2", "cannot hold the sigmoid router"),
    (lambda: _mla_model(normalize_weights=True), "deepseek_v2",
     "cannot hold top-k weights renormalised"),
    (lambda: Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                     num_heads=4, ffn_size=48, moe=MoEConfig(
                                         hidden_size=32, ffn_size=16, num_experts=4,
                                         router="sigmoid", num_shared_experts=1))),
     "deepseek_v3", "cannot hold grouped-query attention"),
])
def test_export_refuses_what_a_layout_cannot_hold(tmp_path, model, layout, message):
    with pytest.raises(ValueError, match=message):
        export_hf(model(), tmp_path / "out", layout)
    assert not (tmp_path / "out").exists()
