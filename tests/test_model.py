"""The MoE Transformer: cached decoding equals recomputation, CLA/GQA cache sizes, padding,
presets built on the meta device, generation."""

import pytest
import torch

from moekit import MoEConfig
from moekit.config import MLAConfig, ModelConfig, preset
from moekit.model import KVCache, Transformer, generate
from moekit.model.generate import sample_next


def _config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                ffn_size=48, max_seq_len=64, cla_share=2, qk_norm=True,
                moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, top_k=2,
                              num_shared_experts=1), moe_every=2)
    base.update(kw)
    return ModelConfig(**base)


def _model(**kw):
    return Transformer(_config(**kw)).double().eval()


@pytest.mark.parametrize("kw", [{}, dict(cla_share=1, num_kv_heads=4), dict(cla_share=3),
                                dict(tie_embeddings=True, qkv_bias=True),
                                dict(qk_norm_placement="head_after_rope"),
                                dict(qk_norm_placement="projection")])
def test_cached_decoding_equals_full_recomputation(kw):
    model = _model(**kw)
    ids = torch.randint(0, 97, (3, 12))
    full = model(ids).logits
    cache = model.new_cache(3, 20)
    pieces = [model(ids[:, :5], cache=cache).logits]
    pieces += [model(ids[:, i:i + 1], cache=cache).logits for i in range(5, 9)]
    pieces.append(model(ids[:, 9:], cache=cache).logits)  # a multi-token chunk after the past
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    torch.testing.assert_close(model(ids, last_only=True).logits, full[:, -1:])
    picked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    torch.testing.assert_close(model(ids, logits_mask=picked).logits, full[picked])


def test_cla_and_gqa_shrink_the_cache():
    model = _model()  # 4 layers in CLA pairs, 2 KV heads of 8
    cache = model.new_cache(batch_size=2, max_len=10)
    groups, kv_heads, head_dim, bytes_per = 2, 2, 8, 8
    assert len(cache.keys) == groups
    assert cache.nbytes == 2 * groups * 2 * kv_heads * 10 * head_dim * bytes_per
    mha = Transformer(_config(cla_share=1, num_kv_heads=4)).double().new_cache(2, 10)
    assert mha.nbytes == cache.nbytes * 2 * 2  # CLA halves it, GQA 4 -> 2 halves it
    assert KVCache.bytes_needed(model.config, 2, 10, torch.float64) == cache.nbytes


def test_cla_layers_reuse_the_first_layers_kv():
    model = _model()
    owners = [layer.attn.owns_kv for layer in model.layers]
    assert owners == [True, False, True, False]
    assert not hasattr(model.layers[1].attn, "k_proj")


def test_left_padded_batch_equals_single_prompts():
    model = _model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6], [9]]
    together = generate(model, prompts, 6)
    alone = [generate(model, [p], 6)[0] for p in prompts]
    assert together == alone


def test_padding_changes_nothing_for_real_tokens():
    model = _model()
    ids = torch.randint(0, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    torch.testing.assert_close(model(padded, mask=mask).logits[:, 3:], model(ids).logits)


def test_moe_stats_and_router_loss_are_reported():
    model = Transformer(_config()).train()
    out = model(torch.randint(0, 97, (2, 9)))
    assert len(out.moe_stats) == 2  # moe_every=2 over 4 layers: layers 1 and 3
    expected = sum(s.router_loss for s in out.moe_stats)
    torch.testing.assert_close(out.router_loss, expected)
    out.logits.sum().add(out.router_loss).backward()


def test_dense_variant_has_no_moe():
    model = Transformer(_config().dense())
    assert not model(torch.randint(0, 97, (1, 4))).moe_stats


def test_greedy_sampling_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(50)}
    assert draws == {1, 3}
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}  # p(1) = 0.64 >= 0.5 alone


def test_generation_stops_at_eos_and_is_seeded():
    model = _model()
    first = generate(model, [[1, 2]], 8, temperature=1.0, seed=3)
    assert first == generate(model, [[1, 2]], 8, temperature=1.0, seed=3)
    eos = first[0][0]
    assert generate(model, [[1, 2]], 8, temperature=1.0, seed=3, eos_id=eos) == [[eos]]


@pytest.mark.parametrize("name", ["skywork-moe-146b", "hunyuan-large-389b", "mixtral-8x7b",
                                  "fastmoe-transformer-xl", "deepseek-v3-671b"])
def test_published_presets_build_on_meta(name):
    with torch.device("meta"):
        model = Transformer(preset(name))
    assert sum(p.numel() for p in model.parameters()) > 1e8


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="longer than the model context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"logits_mask must be a bool tensor of shape \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), logits_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, [[1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 97\)"):
        generate(model, [[100]], 3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        _config(num_kv_heads=3)


def test_config_round_trips_through_a_dict():
    from moekit.config import PRESETS
    for name in PRESETS:
        config = preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown model config keys \['layers'\]"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "layers": 3})


def test_stream_tokens_marks_finished_rows_and_checks_before_the_first_step():
    from moekit.model.generate import stream_tokens
    model = _model()
    alone = generate(model, [[1, 2]], 6)[0]
    eos = alone[2]
    first_eos = alone.index(eos)
    rows = [step[0] for step in stream_tokens(model, [[1, 2], [3, 4, 5]], 6, eos_id=eos)]
    assert rows[:first_eos + 1] == alone[:first_eos + 1]
    assert all(token is None for token in rows[first_eos + 1:])
    with pytest.raises(ValueError, match="non-empty token lists"):
        stream_tokens(model, [[]], 3)  # raised on the call, not on the first next()


def test_expert_weights_are_contiguous_output_major_in_memory_and_files(tmp_path):
    from safetensors.torch import load_file

    from moekit.model import load_model, save_model
    model = _model()
    experts = model.layers[1].ffn.experts
    assert experts.gate_up_proj.shape == (4, 32, 32) and experts.gate_up_proj.is_contiguous()
    assert experts.down_proj.shape == (4, 32, 16) and experts.down_proj.is_contiguous()
    save_model(model, tmp_path / "ck")
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert torch.equal(stored["layers.1.ffn.experts.gate_up_proj"], experts.gate_up_proj)
    loaded = load_model(tmp_path / "ck").layers[1].ffn.experts.gate_up_proj
    assert torch.equal(loaded, experts.gate_up_proj) and loaded.is_contiguous()


@pytest.mark.parametrize("std", [None, 0.02])
def test_expert_init_is_drawn_in_index_order(std):
    # A seed gives the same experts as earlier versions: a draw of the [E, in, out] shape.
    from moekit.moe import GroupedExperts
    experts = GroupedExperts(3, 8, 6)
    torch.manual_seed(5)
    experts.reset_parameters(std)
    torch.manual_seed(5)
    for weight_EOI in (experts.gate_up_proj, experts.down_proj):
        bound = 1 / weight_EOI.shape[2] ** 0.5
        draw_EIO = torch.empty(weight_EOI.shape[0], weight_EOI.shape[2], weight_EOI.shape[1])
        expected = draw_EIO.uniform_(-bound, bound) if std is None else draw_EIO.normal_(0, std)
        assert torch.equal(weight_EOI, expected.transpose(1, 2))


def test_a_stage_keeps_its_layers_under_their_own_names():
    # What a pipeline stage needs: dropping the other blocks renumbers nothing.
    model = _model()
    names = {name for name in model.state_dict() if name.startswith("layers.2.")}
    model.layers.keep([2, 3])
    assert [number for number, _ in model.layers.numbered()] == [2, 3]
    assert model.layers[2] is list(model.layers)[0]
    assert names == {name for name in model.state_dict() if name.startswith("layers.2.")}
    assert not any(name.startswith(("layers.0.", "layers.1.")) for name in model.state_dict())


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True, qkv_bias=True),
                                dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4,
                                                   top_k=1, router="noisy", aux_loss="none",
                                                   activation="gelu")),
                                dict(moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4,
                                                   top_k=2, router="sigmoid",
                                                   num_shared_experts=1,
                                                   shared_expert_gate=True)),
                                dict(mla=MLAConfig(q_lora_rank=8, kv_lora_rank=16,
                                                   qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                   v_head_dim=6), cla_share=1, qk_norm=False,
                                     num_kv_heads=None)])
def test_init_in_parts_draws_the_constructors_values(kw):
    """A sharded run's ranks read a new model from ``init_in_parts``: a part at a time, it
    gives every tensor of ``Transformer(config)`` from the same random state, bit for bit, and
    leaves the generator where the constructor leaves it."""
    from moekit.model.transformer import init_in_parts
    config = _config(**kw)
    torch.manual_seed(7)
    model = Transformer(config)
    after = torch.rand(4)
    torch.manual_seed(7)
    drawn = dict(init_in_parts(config))  # a later value of a name replaces the earlier
    assert torch.equal(torch.rand(4), after)
    want = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert drawn.keys() == want.keys()
    assert [name for name in want if not torch.equal(drawn[name], want[name])] == []
