"""Multi-head latent attention (DeepSeek-V2/V3) against transformers' DeepseekV3Attention with
the same weights; its KV cache (the latent and the shared RoPE key) against transformers'
cache and a hand count; decoding through the cache (absorbed) against the full forward."""
import pytest
import torch

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.model import KVCache, Transformer, generate
from moekit.model.paged import KVBlockPool, PagedBatch
from moekit.model.transformer import LatentAttention, rope_cos_sin
from moekit.plan import count_parameters, kv_cache_plan

transformers = pytest.importorskip("transformers")

MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def _config(q_lora_rank=12, **changes):
    return ModelConfig(**{**dict(
        vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, ffn_size=48,
        mla=MLAConfig(q_lora_rank=q_lora_rank, **MLA), dense_layers=(0,),
        moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, num_shared_experts=1)),
        **changes})


def _hf_config(q_lora_rank, **changes):
    return transformers.DeepseekV3Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        rope_interleave=False, vocab_size=50, num_hidden_layers=3, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=4, n_group=1, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, **MLA, **changes)


@pytest.mark.parametrize("q_lora_rank", [12, None], ids=["q_lora", "q_proj"])
def test_latent_attention_equals_transformers(q_lora_rank):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention, DeepseekV3RotaryEmbedding)
    torch.manual_seed(0)
    hf_config = _hf_config(q_lora_rank)
    hf_config._attn_implementation = "eager"
    reference = DeepseekV3Attention(hf_config, 0).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.3)
    attention = LatentAttention(_config(q_lora_rank)).eval()
    attention.load_state_dict(reference.state_dict())  # the same names, strictly
    x = torch.randn(2, 7, 32)
    positions = torch.arange(7).expand(2, 7)
    causal = torch.full((7, 7), -torch.inf).triu(1)[None, None]
    expected = reference(x, DeepseekV3RotaryEmbedding(hf_config)(x, positions), causal)[0]
    rope = rope_cos_sin(positions, 4, hf_config.rope_parameters["rope_theta"], x.dtype)
    torch.testing.assert_close(attention(x, rope, None)[0], expected, rtol=1e-5, atol=1e-5)


def test_the_cache_holds_the_latent_and_rope_key_as_transformers_does():
    config = _config()
    # Per token and layer: kv_lora_rank + qk_rope_head_dim numbers (16 + 4), not the expanded
    # heads' keys and values (4 * (12 + 6)).
    assert KVCache.bytes_per_token(config, 4) == 3 * (16 + 4) * 4
    hf_model = transformers.DeepseekV3ForCausalLM(_hf_config(12)).eval()
    ids = torch.randint(0, 50, (1, 5))
    cache = hf_model(ids, use_cache=True).cache
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values))
    assert hf_bytes / 5 == KVCache.bytes_per_token(config, 4)
    model = Transformer(config)
    assert model.new_cache(2, 10).nbytes == 2 * 10 * KVCache.bytes_per_token(config, 4)
    plan = kv_cache_plan(config, dtype="fp32")
    assert plan.model_variant == "MLA" and plan.bytes_per_token == 3 * 20 * 4
    assert plan.variant("MHA").bytes_per_token == 3 * 4 * (12 + 6) * 4


def test_parameter_count_equals_the_built_model_and_transformers():
    for q_lora_rank in (12, None):
        config = _config(q_lora_rank)
        built = sum(p.numel() for p in Transformer(config).parameters())
        assert count_parameters(config).total == built
        hf_model = transformers.DeepseekV3ForCausalLM(_hf_config(q_lora_rank))
        assert built == sum(p.numel() for p in hf_model.parameters())


@torch.no_grad()
def test_decoding_through_the_cache_gives_the_full_forward():
    """Positions after the first go through the absorbed path (attention over the latent);
    the full forward expands the latent: the two agree, also with left padding and in a
    paged batch."""
    torch.manual_seed(1)
    model = Transformer(_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.2)
    ids = torch.randint(0, 50, (2, 9))
    full = model(ids).logits
    cache = model.new_cache(2, 12)
    steps = [model(ids[:, :4], cache=cache).logits]
    steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)

    pool = KVBlockPool(model.config, num_blocks=4, block_size=4)
    cache = model.new_cache(1, 5)
    model(ids[:1, :5], cache=cache)
    blocks = pool.allocate(3)
    pool.write(blocks, [keys[0] for keys in cache.keys], [values[0] for values in cache.values])
    paged = model(ids[:1, 5:6], cache=PagedBatch(pool, [blocks], [5])).logits
    torch.testing.assert_close(paged[0, -1], full[0, 5], rtol=1e-5, atol=1e-5)

    prompts = [ids[0, :6].tolist(), ids[1, :3].tolist()]
    alone = [generate(model, [prompt], 4)[0] for prompt in prompts]
    assert generate(model, prompts, 4) == alone


def test_bad_mla_configs_are_refused():
    with pytest.raises(ValueError, match="mla.*takes no num_kv_heads"):
        _config(num_kv_heads=2)
    with pytest.raises(ValueError, match="kv_lora_rank=0 is not allowed"):
        MLAConfig(kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    with pytest.raises(ValueError, match="qk_rope_head_dim=3 is not allowed: must be even"):
        ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ffn_size=48,
                    mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=3,
                                  v_head_dim=6))
    with pytest.raises(ValueError, match=r"dense_layers=\(3,\) is not allowed"):
        _config(dense_layers=(3,))


def test_attention_flops_count_the_score_and_value_widths():
    from moekit.plan import training_flops_per_token
    flops = training_flops_per_token(_config(), 64)
    # Per layer and head, forward: 2 * S * (Dqk + Dv) multiply-adds' FLOPs; x3 with backward.
    assert flops.attention == 3 * 2 * 3 * 4 * (12 + 6) * 64
    assert flops.model_flops == 6 * (flops.active_params + 50 * 32) + flops.attention


def test_layouts_that_split_heads_refuse_latent_attention():
    from moekit.parallel import plan_split
    from moekit.parallel.tensor_parallel import check_tensor_model
    with pytest.raises(ValueError, match="tensor=2 is not allowed with multi-head latent"):
        check_tensor_model(_config(), 2)
    with pytest.raises(ValueError, match="multi-head latent attention .* is not split"):
        plan_split(Transformer(_config()), [2**30, 2**30])


def test_deepseek_v3_preset_counts_as_transformers_and_its_report():
    """671B total as transformers' DeepseekV3ForCausalLM on the meta device (its defaults are
    V3's shapes); 37B active per token as DeepSeek publishes it (with the embedding and output
    matrices); the cache 61 x 576 numbers per token."""
    from moekit.config import preset
    config = preset("deepseek-v3-671b")
    with torch.device("meta"):
        hf_model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config())
        model = Transformer(config)
    params = count_parameters(config)
    assert params.total == sum(p.numel() for p in hf_model.parameters())
    assert params.total == sum(p.numel() for p in model.parameters())
    assert params.active_with_embeddings == pytest.approx(37e9, rel=0.02)
    assert kv_cache_plan(config).bytes_per_token == 61 * (512 + 64) * 2


def test_moekit_check_shrinks_a_latent_attention_model():
    from moekit.config import preset
    from moekit.train.equivalence import shrink
    config, changes = shrink(preset("deepseek-v3-671b"))
    assert config.mla.kv_lora_rank == 16 and config.num_kv_heads is None
    assert config.dense_layers == (0,) and config.is_moe_layer(1)
    assert any("latent attention 512 -> 16" in change for change in changes)
    Transformer(config)(torch.randint(0, config.vocab_size, (1, 5)))


def test_the_serving_engine_decodes_latent_attention_as_generate():
    """Continuous batching over paged latent blocks: requests decoded together get what
    generate gives each alone."""
    from moekit.serve import Engine
    from moekit.serve.engine import Sampling
    from moekit.train.tokenizer import train_tokenizer
    torch.manual_seed(3)
    model = Transformer(_config(vocab_size=257, max_seq_len=64)).eval()
    tokenizer = train_tokenizer([], 257)
    engine = Engine(model, tokenizer, "mla", max_tokens_limit=16, block_size=4, max_batch=8)
    prompts = ["a", "a longer prompt than that", "third"]
    try:
        with engine.scheduler._condition:  # all queued before the scheduler takes the first
            tickets = [engine.submit([prompt], Sampling(max_tokens=10, temperature=0))
                       for prompt in prompts]
        texts = ["".join(piece.text for piece in ticket) for ticket in tickets]
    finally:
        engine.close()
    for prompt, text in zip(prompts, texts):
        alone = generate(model, [tokenizer.encode(prompt)], 10, eos_id=tokenizer.eos_id)[0]
        assert text == tokenizer.decode(alone)
