"""Hugging Face folders, both ways, checked against transformers itself: an exported folder
loads with AutoModelForCausalLM.from_pretrained and gives moekit's logits; a folder that
transformers saved imports with transformers' logits; moekit -> HF -> moekit is bit-exact."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moekit.config import ModelConfig, MoEConfig  # noqa: E402
from moekit.convert import export_hf, import_hf, load_hf  # noqa: E402
from moekit.files import CheckpointError  # noqa: E402
from moekit.model import Transformer, generate, load_model  # noqa: E402
from moekit.train.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

VOCAB = 67
# Scalings unlike 1 (and unlike each other), so that a misplaced one shows.
GRANITE_SCALINGS = dict(embedding_multiplier=3.0, residual_multiplier=0.4,
                        attention_multiplier=0.09, logits_scaling=2.5)


def _moekit_model(layout):
    moe = dict(hidden_size=32, ffn_size=16, num_experts=4, top_k=2)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  ffn_size=40, max_seq_len=64, rope_base=5e5, norm_eps=1e-5)
    configs = {
        "mixtral": ModelConfig(**common, moe=MoEConfig(**moe)),
        "qwen2_moe": ModelConfig(**common, qkv_bias=True, moe_every=2, moe=MoEConfig(
            **moe, normalize_weights=False, num_shared_experts=1, shared_ffn_size=24,
            shared_expert_gate=True)),
        "qwen3_moe": ModelConfig(**common, qk_norm=True, head_dim=16, tie_embeddings=True,
                                 moe=MoEConfig(**moe)),
        "olmoe": ModelConfig(**common, qk_norm=True, qk_norm_placement="projection",
                             moe=MoEConfig(**moe, normalize_weights=False)),
        "hunyuan_v1_moe": ModelConfig(**common, qk_norm=True, qk_norm_placement="head_after_rope",
                                      head_dim=16, moe=MoEConfig(**moe, num_shared_experts=1)),
        "granitemoe": ModelConfig(**common, moe=MoEConfig(**moe), **GRANITE_SCALINGS),
        "llama": ModelConfig(**common),
        "qwen2": ModelConfig(**common, qkv_bias=True),
    }
    model = Transformer(configs[layout])
    with torch.no_grad():  # norms and biases too, so that a misplaced one shows
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("layout", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                    "hunyuan_v1_moe", "granitemoe", "llama", "qwen2"])
def test_export_loads_in_transformers_and_round_trips_exactly(tmp_path, layout):
    model = _moekit_model(layout)
    export_hf(model, tmp_path / "hf", layout)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.model_type == layout
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(hf_model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        back = load_hf(tmp_path / "hf")
        assert torch.equal(back(ids).logits, expected)
    parameters = dict(back.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameters[name], parameter), name


def _tiny_hf_models():
    from transformers import (GraniteMoeConfig, GraniteMoeForCausalLM, HunYuanMoEV1Config,
                              HunYuanMoEV1ForCausalLM, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, MixtralConfig,
                              MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
    moe = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    return {
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common)),
        "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
            shared_expert_intermediate_size=24, **moe, **common)),
        "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(norm_topk_prob=True, **moe,
                                                                **common)),
        "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(num_experts=4, num_experts_per_tok=2,
                                                      **common)),
        # Top-1 given per layer, and the fixed-alpha NTK RoPE of Hunyuan-A13B ("dynamic" + alpha).
        "hunyuan_v1_moe": lambda: HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(
            num_experts=4, moe_topk=[1, 1], head_dim=16, rope_parameters={
                "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 1e4},
            **common)),
        "granitemoe": lambda: GraniteMoeForCausalLM(GraniteMoeConfig(
            num_local_experts=4, num_experts_per_tok=2, **GRANITE_SCALINGS, **common)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
    }


def _saved_hf_model(folder, layout, **save_options):
    hf_model = _tiny_hf_models()[layout]().eval()
    with torch.no_grad():  # HF leaves some weights uninitialised (torch.empty)
        for parameter in hf_model.parameters():
            parameter.normal_(0, 0.2)
    hf_model.save_pretrained(folder, **save_options)
    return hf_model


@pytest.mark.parametrize("layout", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                    "hunyuan_v1_moe", "granitemoe", "llama", "mistral",
                                    "qwen2"])
def test_import_of_a_saved_folder_gives_transformers_logits(tmp_path, layout):
    hf_model = _saved_hf_model(tmp_path / "hf", layout)
    import_hf(tmp_path / "hf", tmp_path / "moekit")
    model = load_model(tmp_path / "moekit")
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(load_hf(tmp_path / "hf")(ids).logits, expected,
                                   rtol=1e-4, atol=1e-5)
        hf_model.generation_config.eos_token_id = None  # 6 tokens each, as moekit's below
        hf_tokens = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=6, pad_token_id=0)
    assert generate(model, ids.tolist(), 6) == hf_tokens[:, ids.shape[1]:].tolist()


def test_sharded_folder_and_bf16_import(tmp_path):
    hf_model = _saved_hf_model(tmp_path / "hf", "mixtral", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_hf(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-5)
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_hf(tmp_path / "bf16").embed_tokens.weight.dtype == torch.bfloat16


def test_broken_shards_and_experts_are_named(tmp_path):
    _saved_hf_model(tmp_path / "hf", "mixtral", max_shard_size="20KB")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index.json: 1 listed tensors are in no shard, "
                       rf"e.g. .*experts.9.w1.weight \(said to be in {shard}"):
        load_hf(tmp_path / "hf")

    from safetensors.torch import load_file, save_file
    _saved_hf_model(tmp_path / "one", "mixtral")
    weights = tmp_path / "one" / "model.safetensors"
    kept = {name: t for name, t in load_file(weights).items() if ".experts.3.w2." not in name}
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.experts: expected gate_proj, "
                                              r"up_proj and down_proj for experts 0..3, found 11"):
        load_hf(tmp_path / "one")


def test_tokenizer_travels_both_ways(tmp_path):
    tokenizer = train_tokenizer(["a few words of text", "more words"], vocab_size=300)
    model = _moekit_model("mixtral")
    (tmp_path / "tok").mkdir()
    tokenizer.save(tmp_path / "tok")
    export_hf(model, tmp_path / "hf", "mixtral", tokenizer_from=tmp_path / "tok")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "more words of text"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {
        "eos_token_id": tokenizer.eos_id}
    # Back in: the imported folder's tokenizer knows its end-of-text token from the HF files.
    import_hf(tmp_path / "hf", tmp_path / "moekit")
    imported = load_tokenizer(tmp_path / "moekit")
    assert imported.eos_id == tokenizer.eos_id and imported.encode(text) == tokenizer.encode(text)


def test_imported_tokenizer_keeps_its_own_end_of_text_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2, "[UNK]": 3},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    _saved_hf_model(tmp_path / "hf", "llama")
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>"}, "chat_template": "{{ messages }}"}))
    import_hf(tmp_path / "hf", tmp_path / "moekit")
    tokenizer = load_tokenizer(tmp_path / "moekit")
    assert tokenizer.eos_id == 2 and tokenizer.encode("hello world") == [0, 1]
    assert json.loads((tmp_path / "moekit" / "tokenizer_config.json").read_text())[
        "chat_template"] == "{{ messages }}"


@pytest.mark.parametrize("change, layout, message", [
    (dict(cla_share=2), "qwen3_moe",
     "cannot hold cross-layer attention .* layouts that can: hunyuan$"),
    (dict(qk_norm=True), "mixtral", "cannot hold QK-norm .* layouts that can: qwen3_moe"),
    (dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, num_shared_experts=1,
                        shared_expert_gate=True)), "mixtral",
     "cannot hold shared experts with a sigmoid gate .* layouts that can: qwen2_moe"),
    (dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, router="sigmoid")),
     "mixtral", "cannot hold the sigmoid router"),
    (dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, router="noisy",
                        aux_loss="none")), "mixtral", "cannot hold FastMoE's zero, noisy"),
    (dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4,
                        router_options={"bias": True})), "mixtral", "cannot hold router_options"),
    (dict(moe_every=2), "mixtral", r"moe_every > 1.* layouts that can: qwen2_moe, qwen3_moe"),
    (dict(), "llama", r"cannot hold MoE feed-forward layers .* mixtral, qwen2_moe, qwen3_moe"),
    (dict(), "gpt2", "layout='gpt2' is not supported"),
    (dict(logits_scaling=6.0), "mixtral",
     "cannot hold GraniteMoE's scalings .* layouts that can: granitemoe"),
    (dict(qk_norm=True, qk_norm_placement="projection"), "qwen3_moe",
     "cannot hold QK-norm over the whole q/k projection .* layouts that can: olmoe"),
    (dict(qk_norm=True, qk_norm_placement="head_after_rope"), "qwen3_moe",
     "cannot hold QK-norm per head after RoPE .* layouts that can: hunyuan_v1_moe"),
    (dict(qk_norm=True, qk_norm_placement="projection", head_dim=16), "olmoe",
     "cannot hold a head_dim other than hidden_size / num_heads"),
    (dict(qk_norm=True, qk_norm_placement="head_after_rope", moe=MoEConfig(
        hidden_size=32, ffn_size=16, num_experts=4, num_shared_experts=1, shared_ffn_size=8)),
     "hunyuan_v1_moe", "cannot hold shared experts not as wide in all as one routed expert"),
    (dict(qk_norm=True, qk_norm_placement="head_after_rope", moe=MoEConfig(
        hidden_size=32, ffn_size=16, num_experts=4, top_k=1, router="switch",
        num_shared_experts=1)), "hunyuan_v1_moe", "cannot hold top-k weights not renormalised"),
])
def test_export_refuses_what_a_layout_cannot_hold(tmp_path, change, layout, message):
    from dataclasses import replace
    model = Transformer(replace(_moekit_model("mixtral").config, **change))
    with pytest.raises(ValueError, match=message):
        export_hf(model, tmp_path / "out", layout)
    assert not (tmp_path / "out").exists()


def test_bad_folders_name_the_file_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="nothing: not a folder"):
        import_hf(tmp_path / "nothing", out)
    _saved_hf_model(tmp_path / "hf", "mixtral")
    config_path = tmp_path / "hf" / "config.json"
    values = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**values, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type='gpt2' is not supported"):
        import_hf(tmp_path / "hf", out)
    config_path.write_text(json.dumps({**values, "intermediate_size": 24}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*experts.gate_up_proj has "
                       r"shape \[4, 80, 32\], the model needs \[4, 48, 32\]"):
        import_hf(tmp_path / "hf", out)
    config_path.write_text(json.dumps(values))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        import_hf(tmp_path / "hf", out)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index"):
        import_hf(tmp_path / "hf", out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("layout, change, message", [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported: moekit does not clamp"),
    ("hunyuan_v1_moe", dict(moe_topk=[1, 2]),
     r"moe_topk=\[1, 2\] is not supported: moekit's MoE layers are all alike"),
    ("hunyuan_v1_moe", dict(num_shared_expert=[1, 2]),
     "num_shared_expert=.* exactly one shared expert"),
    ("hunyuan_v1_moe", dict(use_cla=True), "use_cla=True is not supported"),
])
def test_import_refuses_what_the_layer_cannot_hold(tmp_path, layout, change, message):
    _saved_hf_model(tmp_path / "hf", layout)
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=rf"config.json: {message}"):
        load_hf(tmp_path / "hf")


def test_shards_fill_in_order_and_an_oversized_tensor_goes_alone():
    from moekit.convert.hf_folder import shard_names
    sizes = {"a": 40, "b": 50, "c": 30, "d": 150, "e": 10}
    assert shard_names(sizes, 100) == {
        "a": "model-00001-of-00004.safetensors", "b": "model-00001-of-00004.safetensors",
        "c": "model-00002-of-00004.safetensors", "d": "model-00003-of-00004.safetensors",
        "e": "model-00004-of-00004.safetensors"}
    assert set(shard_names(sizes, 280).values()) == {"model.safetensors"}
    with pytest.raises(ValueError, match="max_shard_bytes=0 is not allowed"):
        export_hf(_moekit_model("mixtral"), "unused", "mixtral", max_shard_bytes=0)
