"""Issue 19's families and features (part B), each against transformers or, for Hunyuan-Large's
own layout that transformers lacks, a folder written here by its published names: GraniteMoE-
Shared, RoPE scaling (linear, dynamic, yarn, llama3), attention output bias, sliding windows,
an explicit list of dense layers; PhiMoE and gpt-oss refused naming the piece moekit lacks."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.convert import export_hf, import_hf, load_hf  # noqa: E402
from moekit.files import CheckpointError  # noqa: E402
from moekit.model import Transformer, generate, load_model  # noqa: E402
from moekit.model.rope import inverse_frequencies  # noqa: E402

VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
             "beta_fast": 8.0, "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}


def _rope_config(kind, **extra):
    # Dynamic scaling acts past max_position_embeddings: the tests run 20-24 positions.
    common = {**COMMON, "max_position_embeddings": 16 if kind == "dynamic" else 64}
    return transformers.LlamaConfig(rope_parameters={**ROPE[kind], "rope_theta": 1e4},
                                    **{**common, **extra})


CASES = {
    "granitemoeshared": lambda: transformers.GraniteMoeSharedConfig(
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24,
        embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.09,
        logits_scaling=2.5, attention_bias=True, **COMMON),
    **{f"llama {kind} RoPE": (lambda kind=kind: _rope_config(kind, attention_bias=True))
       for kind in ROPE},
    "mistral sliding window": lambda: transformers.MistralConfig(sliding_window=5, **COMMON),
    "qwen2 sliding window from layer 1 on": lambda: transformers.Qwen2Config(
        use_sliding_window=True, sliding_window=4, max_window_layers=1, **COMMON),
    "qwen3_moe mlp_only_layers": lambda: transformers.Qwen3MoeConfig(
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16,
        mlp_only_layers=[0], **{**COMMON, "num_hidden_layers": 3}),
}


@pytest.mark.parametrize("case", CASES)
def test_family_imports_and_exports_with_transformers_logits(tmp_path, case):
    hf_model = AutoModelForCausalLM.from_config(CASES[case]()).eval()
    with torch.no_grad():  # norms and biases too, so that a misplaced one shows
        for parameter in hf_model.parameters():
            parameter.normal_(0, 0.2)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded
    import_hf(tmp_path / "hf", tmp_path / "moekit")
    model = load_model(tmp_path / "moekit")
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        hf_model.generation_config.eos_token_id = None
        prompt = ids[:, :10]  # 10 + 10 positions: past every window and dynamic's context
        hf_tokens = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      do_sample=False, max_new_tokens=10, pad_token_id=0)
        assert generate(model, prompt.tolist(), 10) == hf_tokens[:, 10:].tolist()
        export_hf(model, tmp_path / "back", hf_model.config.model_type)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        torch.testing.assert_close(back(ids).logits, expected, rtol=1e-4, atol=1e-5)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["max_position_embeddings"] == hf_model.config.max_position_embeddings
    assert written["sliding_window"] == (model.config.sliding_window and
                                         hf_model.config.sliding_window)


@pytest.mark.parametrize("kind", ROPE)
def test_rope_frequencies_are_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = _rope_config(kind, head_dim=16)
    scaling = {key: value for key, value in ROPE[kind].items()}
    scaling.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    for seq_len in (8, 40):  # inside and past the original context
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
        got, got_scaling = inverse_frequencies(16, 1e4, scaling, seq_len)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert got_scaling == pytest.approx(expected_scaling, rel=1e-12)
    plain, _ = inverse_frequencies(16, 1e4)
    assert not torch.allclose(got, plain)  # each kind changes the frequencies


# Hunyuan-Large's modeling code (HunYuanForCausalLM): per layer the names below; a CLA
# follower (layer % cla_share_factor != 0) has q_proj and o_proj but no k_proj / v_proj, and
# normalises the keys it reuses with its own key_layernorm.
HUNYUAN_LARGE_NAMES = {
    "attn.q_proj.": "self_attn.q_proj.", "attn.k_proj.": "self_attn.k_proj.",
    "attn.v_proj.": "self_attn.v_proj.", "attn.o_proj.": "self_attn.o_proj.",
    "attn.q_norm.": "self_attn.query_layernorm.", "attn.k_norm.": "self_attn.key_layernorm.",
    "attn_norm.": "input_layernorm.", "ffn_norm.": "post_attention_layernorm.",
    "ffn.router.": "mlp.gate.wg.", "ffn.shared_experts.": "mlp.shared_mlp.",
}


def _hunyuan_large_folder(folder, model):
    from safetensors.torch import save_file
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight,
               "model.norm.weight": model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for index, block in model.layers.numbered():
        for name, tensor in block.state_dict().items():
            prefix = f"model.layers.{index}."
            if name.startswith("ffn.experts."):
                gate_up, down = block.ffn.experts.gate_up_proj, block.ffn.experts.down_proj
                for expert in range(gate_up.shape[0]):
                    gate, up = gate_up[expert].chunk(2)
                    for part, matrix in (("gate", gate), ("up", up), ("down", down[expert])):
                        tensors[f"{prefix}mlp.experts.{expert}.{part}_proj.weight"] = matrix
            elif not name.endswith(("router_step", "aux_coefficient.value")):
                ours = next(key for key in HUNYUAN_LARGE_NAMES if name.startswith(key))
                tensors[prefix + HUNYUAN_LARGE_NAMES[ours] + name[len(ours):]] = tensor
    folder.mkdir()
    save_file({name: t.contiguous() for name, t in tensors.items()},
              str(folder / "model.safetensors"))
    config = model.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["HunYuanForCausalLM"], "model_type": "hunyuan",
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_head_dim": 16,
        "intermediate_size": 24, "moe_intermediate_size": 16, "max_position_embeddings": 64,
        "rms_norm_eps": config.norm_eps, "rope_theta": 1e4, "hidden_act": "silu",
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        "use_qk_norm": True, "use_cla": True, "cla_share_factor": 2, "use_mixed_mlp_moe": True,
        "num_experts": 4, "moe_topk": 1, "num_shared_expert": 1, "attention_bias": False,
        "tie_word_embeddings": False}))
    return tensors


def test_hunyuan_large_layout_maps_onto_moekit_cla(tmp_path):
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, ffn_size=24, max_seq_len=64, rope_base=1e4 * 1000.0 ** (16 / 14),
        norm_eps=1e-5, qk_norm=True, qk_norm_placement="head_after_rope", cla_share=2,
        moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, top_k=1,
                      normalize_weights=False, num_shared_experts=1, shared_ffn_size=24))
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    tensors = _hunyuan_large_folder(tmp_path / "hy", model)
    import_hf(tmp_path / "hy", tmp_path / "moekit")
    imported = load_model(tmp_path / "moekit")
    assert imported.config == config
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, model(ids).logits)
    assert generate(imported, ids[:, :6].tolist(), 6) == generate(model, ids[:, :6].tolist(), 6)
    export_hf(imported, tmp_path / "back", "hunyuan")
    from safetensors.torch import load_file
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[name], tensors[name]) for name in tensors)


def test_cla_follower_normalises_the_shared_keys_with_its_own_weights():
    # Independent of the model's code: layer 1's attention by hand, keys of layer 0's k_proj
    # rotated (layer 0's positions) then normalised by layer 1's key norm.
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=2, ffn_size=16, norm_eps=1e-5, qk_norm=True,
                         qk_norm_placement="head_after_rope", cla_share=2)
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    x = torch.randn(1, 5, 32)
    owner, follower = model.layers[0].attn, model.layers[1].attn
    positions = torch.arange(5)
    inv_freq = 1.0 / 1e4 ** (torch.arange(0, 16, 2) / 16)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, -1)

    def rotate(t):  # [S, H, Dh]
        first, second = t.chunk(2, -1)
        return t * angles.cos()[:, None] + torch.cat([-second, first], -1) * angles.sin()[:, None]

    def rms(t, weight):
        return weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)

    h = x[0]
    keys = rms(rotate(owner.k_proj(h).view(5, 2, 16)), follower.k_norm.weight)
    queries = rms(rotate(follower.q_proj(h).view(5, 2, 16)), follower.q_norm.weight)
    values = owner.v_proj(h).view(5, 2, 16)
    scores = torch.einsum("shd,thd->hst", queries, keys) / 4.0
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expected = follower.o_proj(torch.einsum("hst,thd->shd", scores.softmax(-1),
                                            values).reshape(5, 32))
    from moekit.model.rope import rope_cos_sin
    rope = rope_cos_sin(positions[None], 16, 1e4, torch.float32)
    with torch.no_grad():
        _, shared = owner(x, rope, None)
        got, _ = follower(x, rope, None, shared_kv=shared)
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(follower.k_norm.weight, owner.k_norm.weight)


@pytest.mark.parametrize("model_type, message", [
    ("phimoe", "PhiMoE's sparse-mixer routing"), ("gpt_oss", "gpt-oss's attention sinks")])
def test_phimoe_and_gpt_oss_are_refused_naming_the_missing_piece(tmp_path, model_type, message):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(CheckpointError, match=rf"model_type='{model_type}' is not supported: "
                                              rf"{message}"):
        load_hf(tmp_path / "hf")
    assert not (tmp_path / "out").exists()


def test_bf16_folder_imports_in_bf16_with_its_weights_split_as_stored(tmp_path):
    hf_model = AutoModelForCausalLM.from_config(CASES["granitemoeshared"]()).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    fused = hf_model.model.layers[1].shared_mlp.input_linear.weight
    shared = model.layers[1].ffn.shared_experts
    assert torch.equal(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]), fused)
    assert torch.equal(model.layers[1].attn.o_proj.bias,
                       hf_model.model.layers[1].self_attn.o_proj.bias)
