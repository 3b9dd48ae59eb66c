"""Upcycling: at initialisation the MoE model gives the dense model's logits (evaluation is
dropless), for top-1 and top-2, fine-grained, with and without shared experts."""
from dataclasses import replace

import pytest
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.convert import upcycle
from moekit.model import Transformer
from moekit.plan import count_parameters

DENSE = ModelConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    ffn_size=48, max_seq_len=64)


def _dense(config=DENSE):
    model = Transformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("granularity", [1, 2, 3])
@pytest.mark.parametrize("shared", ["none", "plain", "gated"])
def test_upcycled_logits_equal_the_dense_logits(top_k, granularity, shared):
    dense = _dense()
    moe = MoEConfig(hidden_size=32, ffn_size=48, num_experts=4, top_k=top_k,
                    num_shared_experts=0 if shared == "none" else 1,
                    shared_expert_gate=shared == "gated")
    model = upcycle(dense, moe, granularity=granularity, seed=1).eval()
    assert model.config.moe.num_experts == 4 * granularity
    assert model.config.moe.top_k == top_k * granularity
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out.logits, dense(ids).logits, rtol=1e-4, atol=1e-5)
    # The router really spreads tokens: several experts get some.
    assert all(int((stats.tokens_per_expert_E > 0).sum()) > top_k * granularity
               for stats in out.moe_stats)


def test_fine_grained_experts_are_slices_of_the_dense_ffn():
    dense = _dense()
    model = upcycle(dense, MoEConfig(hidden_size=32, ffn_size=48, num_experts=2, top_k=1),
                    granularity=2)
    mlp, experts = dense.layers[0].ffn, model.layers[0].ffn.experts
    # Expert 3 is coarse expert 1's second slice: hidden units 24..47, down scaled by 2.
    assert torch.equal(experts.gate_up_proj[3], torch.cat([mlp.gate_proj.weight[24:],
                                                           mlp.up_proj.weight[24:]]))
    assert torch.equal(experts.down_proj[3], 2 * mlp.down_proj.weight[:, 24:])
    router = model.layers[0].ffn.router.weight
    assert torch.equal(router[2], router[3]) and not torch.equal(router[1], router[2])


def test_noise_has_the_asked_relative_size_and_is_seeded():
    dense = _dense()
    moe = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2)
    model = upcycle(dense, moe, noise_std=0.1, seed=3)
    weight = dense.layers[1].ffn.down_proj.weight
    noise = model.layers[1].ffn.experts.down_proj - weight
    assert (noise.std() / weight.std()).item() == pytest.approx(0.1, rel=0.05)
    assert not torch.equal(noise[0], noise[1])
    again = upcycle(dense, moe, noise_std=0.1, seed=3)
    assert torch.equal(again.layers[1].ffn.experts.down_proj,
                       model.layers[1].ffn.experts.down_proj)


def test_moe_every_keeps_the_other_layers_dense_and_copies_everything_else():
    dense = _dense()
    model = upcycle(dense, MoEConfig(hidden_size=32, ffn_size=48, num_experts=4), moe_every=2)
    assert [model.config.is_moe_layer(i) for i in range(3)] == [False, True, False]
    moe_names = {n for n, _ in model.named_parameters() if ".ffn." in n and "layers.1." in n}
    dense_state = dense.state_dict()
    for name, tensor in model.state_dict().items():
        if name in dense_state:
            assert torch.equal(tensor, dense_state[name]), name
        else:
            assert name.startswith("layers.1.ffn.")
    assert moe_names and dense.config.moe is None  # the dense model is left as it was


@pytest.mark.parametrize("change, options, message", [
    (dict(ffn_size=40), {}, r"moe.ffn_size=40 .* must equal the dense ffn_size \(48\)"),
    ({}, dict(granularity=5), r"granularity=5 .* divides the dense ffn_size \(48\)"),
    (dict(num_shared_experts=2), {}, r"shared_ffn_size = 96 .* dense ffn_size \(48\)"),
    (dict(activation="relu"), {}, r"activation='relu' .* 'swiglu'"),
    ({}, dict(noise_std=-1.0), r"noise_std=-1.0"),
])
def test_bad_requests_are_named(change, options, message):
    moe = replace(MoEConfig(hidden_size=32, ffn_size=48, num_experts=4), **change)
    with pytest.raises(ValueError, match=message):
        upcycle(_dense(), moe, **options)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(upcycle(_dense(), MoEConfig(hidden_size=32, ffn_size=48, num_experts=4)),
                MoEConfig(hidden_size=32, ffn_size=48, num_experts=4))


def test_active_parameters_by_hand():
    model = upcycle(_dense(), MoEConfig(hidden_size=32, ffn_size=48, num_experts=4, top_k=2))
    d, f, v, layers, kv = 32, 48, 97, 3, 2 * 8
    attention = d * d + 2 * d * kv + d * d + 2 * d  # q, k and v (2 heads of 8), o, two norms
    moe = 4 * d + 2 * 3 * d * f  # router + top-2 of the SwiGLU experts
    active = layers * (attention + moe) + d + v * d  # + final norm + lm_head (not the lookup)
    count = count_parameters(model.config)  # what `moekit upcycle` prints for the advice
    assert count.active_without_embeddings + count.output_matrix == active
