"""Gates against the textbook formulas, computed token by token."""
import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import Gate, Routing, SigmoidBiasGate, build_gate
from reference import softmax_topk


def _config(**kw):
    base = dict(hidden_size=16, ffn_size=8, num_experts=6, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_softmax_topk_matches_formula(top_k, normalize):
    gate = build_gate(_config(top_k=top_k, normalize_weights=normalize)).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    routing = gate(x)
    ids, weights, probs = softmax_topk(x, gate.weight.detach(), top_k, normalize)
    assert torch.equal(routing.expert_ids_TK, ids)
    torch.testing.assert_close(routing.weights_TK, weights)
    torch.testing.assert_close(routing.probs_TE, probs)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_skywork_logit_normalization_matches_formula(scale):
    gate = build_gate(_config(logit_norm_scale=scale)).double()
    x = torch.randn(20, 16, dtype=torch.float64) * 10
    routing = gate(x)
    ids, weights, probs = softmax_topk(x, gate.weight.detach(), 2, True, logit_norm_scale=scale)
    assert torch.equal(routing.expert_ids_TK, ids)
    torch.testing.assert_close(routing.probs_TE, probs)
    # The normalised logits have mean 0 and population std = scale (up to eps).
    torch.testing.assert_close(routing.logits_TE.mean(-1), torch.zeros(20, dtype=torch.float64))
    torch.testing.assert_close(routing.logits_TE.std(-1, correction=0),
                               torch.full((20,), scale, dtype=torch.float64), rtol=1e-5, atol=0)


def test_logit_normalization_sharpens_with_scale():
    x = torch.randn(200, 16)
    ratios = []
    for scale in (0.5, 1.0, 4.0):
        torch.manual_seed(1)
        layer = MoELayer(_config(logit_norm_scale=scale))
        ratios.append(layer(x)[1].max1_over_max2)
    assert ratios[0] < ratios[1] < ratios[2]


def test_switch_router_is_top1_raw_probability():
    gate = build_gate(_config(router="switch", top_k=1))
    x = torch.randn(10, 16)
    routing = gate(x)
    probs = torch.softmax(x @ gate.weight.detach().T, -1)
    assert torch.equal(routing.expert_ids_TK[:, 0], probs.argmax(-1))
    torch.testing.assert_close(routing.weights_TK[:, 0], probs.max(-1).values)


def test_jitter_applies_only_in_training():
    gate = build_gate(_config(jitter=0.5))
    x = torch.randn(50, 16)
    gate.eval()
    assert torch.equal(gate(x).logits_TE, gate(x).logits_TE)
    gate.train()
    assert not torch.equal(gate(x).logits_TE, gate(x).logits_TE)


def test_sigmoid_gate_selects_by_biased_score_and_weighs_by_score():
    gate = SigmoidBiasGate(16, 6, 2, normalize_weights=True)
    x = torch.randn(30, 16)
    gate.balance_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 5.0]))  # force experts 0 and 5
    routing = gate(x)
    assert sorted(set(routing.expert_ids_TK.flatten().tolist())) == [0, 5]
    scores = torch.sigmoid(x @ gate.weight.detach().T)[:, [0, 5]]
    expected = scores / scores.sum(-1, keepdim=True)
    got = routing.weights_TK.gather(-1, routing.expert_ids_TK.argsort(-1))
    torch.testing.assert_close(got, expected)


def test_sigmoid_bias_moves_towards_balance():
    gate = SigmoidBiasGate(16, 4, 1, bias_update_rate=0.1)
    gate.observe_load(torch.tensor([10, 2, 2, 2]))
    # mean load 4: the overloaded expert's bias falls, the others rise, by the rate.
    torch.testing.assert_close(gate.balance_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_sigmoid_router_balances_a_skewed_layer_without_aux_loss():
    layer = MoELayer(_config(router="sigmoid", top_k=1, num_experts=4, aux_loss="none",
                             bias_update_rate=0.05))
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # expert 0 wins almost everything at first
    x = torch.randn(400, 16).abs()
    first = layer(x)[1].expert_load.max()
    for _ in range(60):
        layer.update_router_state(layer(x)[1].counts)
    last = layer(x)[1].expert_load.max()
    assert first > 0.8 and last < 0.4


class EveryTokenToLastExpert(Gate):
    def forward(self, x_TD):
        ids = torch.full((len(x_TD), 1), self.num_experts - 1, dtype=torch.long)
        return Routing(expert_ids_TK=ids, weights_TK=torch.full((len(x_TD), 1), 0.5),
                       aux_loss=torch.tensor(3.0))


def test_user_gate_plugs_in():
    config = _config(top_k=1)
    layer = MoELayer(config, router=EveryTokenToLastExpert(config.num_experts, 1))
    x = torch.randn(5, 16)
    out, stats = layer(x)
    from reference import expert_forward
    expected = torch.stack([0.5 * expert_forward(layer.experts, 5, t) for t in x])
    torch.testing.assert_close(out, expected)
    assert stats.tokens_per_expert_E.tolist() == [0, 0, 0, 0, 0, 5]
    assert stats.prob_sum_E is None and math.isclose(float(stats.router_loss), 3.0)
