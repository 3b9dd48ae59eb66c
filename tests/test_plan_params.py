"""Parameter counts from the config: equal to the built model's, and to the published totals."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.config import ModelConfig, MoEConfig, preset
from moekit.model import Transformer
from moekit.plan import count_parameters

# Which component each of the model's weights belongs to, read from its name (the reference).
COMPONENT_OF_NAME = [
    (r"^embed_tokens\.", "embeddings"),
    (r"^lm_head\.", "output"),
    (r"\.ffn\.experts\.", "routed_experts"),
    (r"\.ffn\.(shared_experts|shared_gate)\.", "shared_experts"),
    (r"\.ffn\.router\.", "router"),
    (r"\.ffn\.(gate|up|down)_proj\.", "dense_ffn"),
    (r"(^|\.)(attn_norm|ffn_norm|norm|q_norm|k_norm)\.weight$", "norms"),
    (r"\.attn\.[qkvo]_proj\.", "attention"),
]


def built_model_counts(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Total and active parameters per component of the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
    counts = {}
    for name, weight in model.named_parameters():
        component = next(c for pattern, c in COMPONENT_OF_NAME if re.search(pattern, name))
        total = weight.numel()
        # Each token passes through top_k of the layer's experts; the rest of the model whole.
        active = (total * config.moe.top_k // config.moe.num_experts
                  if component == "routed_experts" else total)
        entry = counts.setdefault(component, {"total": 0, "active": 0})
        entry["total"] += total
        entry["active"] += active
    return counts


def check_against_built_model(config: ModelConfig) -> None:
    counts = count_parameters(config)
    reference = built_model_counts(config)
    with torch.device("meta"):
        assert counts.total == sum(p.numel() for p in Transformer(config).parameters())
    for component in counts.components:
        expected = reference.get(component.name, {"total": 0, "active": 0})
        assert component.total == expected["total"], component.name
        if component.name != "output":
            assert component.active == expected["active"], component.name
    # The output projection multiplies every token, also when it is the tied embedding.
    vocab_matrix = config.vocab_size * config.hidden_size
    assert counts.component("output").active == vocab_matrix
    assert counts.active_without_embeddings == sum(
        entry["active"] for name, entry in reference.items()
        if name not in ("embeddings", "output"))


@pytest.mark.parametrize("name", ["tiny", "skywork-moe-146b", "hunyuan-large-389b",
                                  "mixtral-8x7b", "fastmoe-transformer-xl"])
def test_presets_equal_the_built_model(name):
    check_against_built_model(preset(name))


@st.composite
def model_configs(draw):
    heads = draw(st.sampled_from([2, 4, 6]))
    head_dim = draw(st.sampled_from([4, 8]))
    hidden = draw(st.sampled_from([8, 16, 24]))
    moe = None
    if draw(st.booleans()):
        experts = draw(st.integers(1, 6))
        moe = MoEConfig(hidden_size=hidden, ffn_size=draw(st.sampled_from([4, 12])),
                        num_experts=experts, top_k=draw(st.integers(1, experts)),
                        activation=draw(st.sampled_from(["swiglu", "gelu"])),
                        num_shared_experts=draw(st.integers(0, 2)),
                        shared_ffn_size=draw(st.sampled_from([None, 6])),
                        shared_expert_gate=draw(st.booleans()))
    return ModelConfig(
        vocab_size=draw(st.integers(5, 40)), hidden_size=hidden,
        num_layers=draw(st.integers(1, 5)), num_heads=heads,
        num_kv_heads=draw(st.sampled_from([d for d in (1, 2, heads) if heads % d == 0])),
        head_dim=head_dim, ffn_size=draw(st.sampled_from([8, 20])),
        activation=draw(st.sampled_from(["swiglu", "relu"])),
        tie_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        qk_norm_placement=draw(st.sampled_from(["head", "head_after_rope", "projection"])),
        cla_share=draw(st.integers(1, 3)), attention_out_bias=draw(st.booleans()),
        moe=moe, moe_every=draw(st.integers(1, 3)), dense_layers=draw(st.sets(st.integers(0, 0))))


@settings(max_examples=80, deadline=None)
@given(model_configs())
def test_any_config_equals_the_built_model(config):
    check_against_built_model(config)


def test_tied_embedding_is_stored_once_but_multiplies_on_both_sides():
    config = ModelConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32,
                         tie_embeddings=True)
    counts = count_parameters(config)
    # Hand count: the 100 x 16 matrix, once in the total, twice among the active.
    assert counts.total - counts.active_without_embeddings == 1600
    assert counts.active_with_embeddings - counts.active_without_embeddings == 3200


# Published totals (billions) and the convention each publisher uses for active parameters.
PUBLISHED = [
    # Skywork-MoE technical report (arXiv 2406.06563), abstract and Table 1: 146B total, 22B
    # activated; 22B is the count without the embedding and output matrices (decisions.md).
    ("skywork-moe-146b", 146, 22, "active_without_embeddings"),
    # Hunyuan-Large report (arXiv 2411.02265), abstract: 389B total, 52B activated, a count that
    # includes the embedding and output matrices.
    ("hunyuan-large-389b", 389, 52, "active_with_embeddings"),
    # Mistral AI, "Mixtral of experts" (mistral.ai/news/mixtral-of-experts, Dec 2023): 46.7B
    # total, 12.9B used per token, embeddings included.
    ("mixtral-8x7b", 46.7, 12.9, "active_with_embeddings"),
]


@pytest.mark.parametrize("name, total, active, convention", PUBLISHED)
def test_published_totals_within_one_percent(name, total, active, convention):
    counts = count_parameters(preset(name))
    assert counts.total / 1e9 == pytest.approx(total, rel=0.01)
    assert getattr(counts, convention) / 1e9 == pytest.approx(active, rel=0.01)
