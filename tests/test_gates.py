"""FastMoE's gates (zero, naive with a bias, noisy, GShard) chosen by name, and the checks on a
user gate's Routing, each against a hand computation token by token."""
import math

import pytest
import torch

from moekit import Gate, MoEConfig, MoELayer, Routing
from moekit.config import ROUTERS
from moekit.moe import FASTMOE_NOISY_OPTIONS, GATES, build_gate, smooth_load
from moekit.moe.capacity import expert_capacity, limit_to_capacity
from reference import capacity_keep, expert_forward, moe_forward


def _config(**kw):
    base = dict(hidden_size=16, ffn_size=8, num_experts=6, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _cv_squared(values):
    """Population variance over the squared mean, by hand."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / (mean ** 2 + 1e-10)


def test_every_config_router_name_has_a_gate():
    assert set(GATES) == set(ROUTERS)


@pytest.mark.parametrize("router, options, words", [
    ("softmax", {"temperature": 2.0}, ["['temperature']", "'softmax'", "allowed: ['bias', 'n_group',"]),
    ("zero", {"bias": True}, ["['bias']", "'zero'", "allowed: none"]),
    ("softmax", {"bias": 1}, ["bias=1", "true or false"]),
    ("noisy", {"load_weight": -1.0}, ["load_weight=-1.0", "finite number >= 0"]),
])
def test_unknown_or_bad_router_option_is_refused(router, options, words):
    extra = {"aux_loss": "none"} if router == "noisy" else {}
    with pytest.raises(ValueError) as error:
        MoELayer(_config(router=router, router_options=options, **extra))
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("change, words", [
    (dict(router="noisy"), ["aux_loss='switch'", "own balancing loss", 'aux_loss="none"']),
    (dict(router="gshard", top_k=1, aux_loss="none"), ["top_k=1", "2 experts"]),
    (dict(router="gshard", aux_loss="none", overflow="recycle_random"), ["overflow="]),
    (dict(router_options=["bias"]), ["router_options=['bias']", "dict"]),
])
def test_bad_gate_config_is_refused(change, words):
    with pytest.raises(ValueError) as error:
        _config(**change)
    for word in words:
        assert word in str(error.value)


def test_zero_gate_sends_every_route_to_expert_0_with_weight_one_over_k():
    layer = MoELayer(_config(router="zero", top_k=3))
    x = torch.randn(7, 16)
    out, stats = layer(x)
    assert stats.tokens_per_expert_E.tolist() == [21, 0, 0, 0, 0, 0]
    expected = torch.stack([expert_forward(layer.experts, 0, t) for t in x])  # 3 * (1/3) * E_0
    torch.testing.assert_close(out, expected)


def test_naive_gate_is_softmax_over_the_top_k_logits_with_a_bias():
    # FastMoE's NaiveGate: z = W x + b; softmax over the top K of z (= renormalised top K).
    gate = build_gate(_config(router_options={"bias": True})).double()
    with torch.no_grad():
        gate.bias.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64))
    x = torch.randn(12, 16, dtype=torch.float64)
    routing = gate(x)
    w, b = gate.weight.detach(), gate.bias.detach()
    for t in range(12):
        z = [float(w[e] @ x[t] + b[e]) for e in range(6)]
        top = sorted(range(6), key=lambda e: -z[e])[:2]
        total = sum(math.exp(z[e]) for e in top)
        assert routing.expert_ids_TK[t].tolist() == top
        for k, e in enumerate(top):
            assert math.isclose(float(routing.weights_TK[t, k].detach()), math.exp(z[e]) / total,
                                rel_tol=1e-12)


def _noisy_reference(x, w_gate, w_noise, top_k, noise_epsilon, normal_TE=None):
    """Shazeer et al. 2017, token by token: (ids, weights, importance, load)."""
    num_tokens, num_experts = len(x), len(w_gate)
    ids, weights = [], []
    importance, load = [0.0] * num_experts, [0.0] * num_experts
    for t in range(num_tokens):
        clean = [float(w_gate[e] @ x[t]) for e in range(num_experts)]
        if normal_TE is None:
            noisy, std = clean, None
        else:
            std = [math.log1p(math.exp(float(w_noise[e] @ x[t]))) + noise_epsilon
                   for e in range(num_experts)]
            noisy = [clean[e] + float(normal_TE[t, e]) * std[e] for e in range(num_experts)]
        top = sorted(range(num_experts), key=lambda e: -noisy[e])[:top_k]
        total = sum(math.exp(noisy[e]) for e in top)
        ids.append(top)
        weights.append([math.exp(noisy[e]) / total for e in top])
        for e, g in zip(top, weights[-1]):
            importance[e] += g
        for e in range(num_experts):
            if std is None:
                load[e] += e in top
            else:
                others = sorted((noisy[j] for j in range(num_experts) if j != e), reverse=True)
                load[e] += _phi((clean[e] - others[top_k - 1]) / std[e])
    return ids, weights, importance, load


@pytest.mark.parametrize("training", [False, True])
def test_noisy_gate_matches_the_paper(training):
    config = _config(router="noisy", aux_loss="none", top_k=2,
                     router_options=FASTMOE_NOISY_OPTIONS)
    gate = build_gate(config).double().train(training)
    with torch.no_grad():
        gate.noise_weight.normal_(std=0.3)
    x = torch.randn(10, 16, dtype=torch.float64)
    torch.manual_seed(5)
    routing = gate(x)
    torch.manual_seed(5)
    normal_TE = torch.randn(10, 6, dtype=torch.float64) if training else None
    ids, weights, importance, load = _noisy_reference(
        x, gate.weight.detach(), gate.noise_weight.detach(), 2, 0.01, normal_TE)
    assert routing.expert_ids_TK.tolist() == ids
    torch.testing.assert_close(routing.weights_TK, torch.tensor(weights, dtype=torch.float64))
    expected_loss = _cv_squared(importance) + _cv_squared(load)  # FastMoE's weights: 1 and 1
    assert math.isclose(float(routing.aux_loss.detach()), expected_loss, rel_tol=1e-9)


def test_smooth_load_matches_a_monte_carlo_count():
    # P(x, i): expert i's chance to stay in the top K when only its own noise is drawn again.
    generator = torch.Generator().manual_seed(0)
    num_tokens, num_experts, top_k, draws = 6, 5, 2, 20000
    clean = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    std = torch.rand(num_tokens, num_experts, generator=generator, dtype=torch.float64) + 0.3
    noisy = clean + torch.randn(num_tokens, num_experts, generator=generator,
                                dtype=torch.float64) * std
    counts = torch.zeros(num_experts, dtype=torch.float64)
    for t in range(num_tokens):
        for i in range(num_experts):
            redrawn = clean[t, i] + torch.randn(draws, generator=generator,
                                                dtype=torch.float64) * std[t, i]
            others = torch.cat([noisy[t, :i], noisy[t, i + 1:]])
            beaten_by = (others[None, :] > redrawn[:, None]).sum(1)
            counts[i] += (beaten_by < top_k).double().mean()
    # Each count sums 6 frequencies of 20000 draws: standard error < 0.011.
    torch.testing.assert_close(smooth_load(clean, noisy, std, top_k), counts, atol=0.05, rtol=0)


def test_choice_major_capacity_matches_a_loop():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4, (40, 2), generator=generator)
    keep = torch.rand(40, 2, generator=generator) > 0.2
    got = limit_to_capacity(ids, keep, 9, 4, priority="choice")
    assert torch.equal(got, capacity_keep(ids, keep, 9, 4, choice_major=True))
    assert not torch.equal(got, capacity_keep(ids, keep, 9, 4))  # token order differs here
    with pytest.raises(ValueError, match="priority='expert'.*token, choice"):
        limit_to_capacity(ids, keep, 9, 4, priority="expert")


def _gshard_reference(x, weight, capacity_factor, uniform_T):
    """GShard's top-2 gate by hand: (ids, weights, keep, over_capacity, aux loss)."""
    num_tokens, num_experts = len(x), len(weight)
    probs = torch.softmax(x @ weight.T, -1)
    ids, weights, keep = [], [], []
    for t in range(num_tokens):
        first, second = sorted(range(num_experts), key=lambda e: -float(probs[t, e]))[:2]
        g1, g2 = float(probs[t, first]), float(probs[t, second])
        ids.append([first, second])
        weights.append([g1 / (g1 + g2), g2 / (g1 + g2)])
        keep.append([True, float(uniform_T[t]) < 2 * g2 / (g1 + g2)])
    ids, keep = torch.tensor(ids), torch.tensor(keep)
    capacity = math.ceil(capacity_factor * 2 * num_tokens / num_experts)
    within = capacity_keep(ids, keep, capacity, num_experts, choice_major=True)
    first_share = [sum(1 for t in range(num_tokens) if ids[t, 0] == e) / num_tokens
                   for e in range(num_experts)]
    mean_prob = probs.mean(0).tolist()
    aux = num_experts * sum(c * m for c, m in zip(first_share, mean_prob))
    return ids, torch.tensor(weights, dtype=x.dtype), within, keep & ~within, aux


def test_gshard_gate_and_layer_match_the_paper():
    config = _config(router="gshard", aux_loss="none", num_experts=4, capacity_factor=0.6,
                     router_options={"balance_weight": 1.0})
    layer = MoELayer(config).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    torch.manual_seed(3)
    routing = layer.router(x)
    torch.manual_seed(3)
    uniform_T = torch.rand(30, dtype=torch.float64)
    ids, weights, keep, over, aux = _gshard_reference(x, layer.router.weight.detach(), 0.6,
                                                      uniform_T)
    assert torch.equal(routing.expert_ids_TK, ids)
    torch.testing.assert_close(routing.weights_TK, weights)
    assert torch.equal(routing.keep_TK, keep) and torch.equal(routing.over_capacity_TK, over)
    assert 0 < int(over.sum()) and not keep[:, 1].all()  # both rules bite in this example
    assert math.isclose(float(routing.aux_loss.detach()), aux, rel_tol=1e-12)
    # The layer takes the gate's capacity as it is (token order would keep other routes).
    torch.manual_seed(3)
    out, stats = layer(x)
    torch.testing.assert_close(out, moe_forward(layer, x, ids, weights, keep))
    assert stats.overflowed == int(over.sum())
    assert stats.dropped == int((~keep).sum())


def test_gshard_in_evaluation_keeps_both_choices_without_eval_capacity():
    layer = MoELayer(_config(router="gshard", aux_loss="none", capacity_factor=0.5)).eval()
    routing = layer.router(torch.randn(20, 16))
    assert routing.keep_TK is None and routing.over_capacity_TK is None
    assert expert_capacity(20, 2, 6, 0.5) < 20  # training would have dropped


class BadGate(Gate):
    def __init__(self, num_experts, top_k, change):
        super().__init__(num_experts, top_k)
        self.change = change

    def forward(self, x_TD):
        routing = Routing(expert_ids_TK=torch.zeros(len(x_TD), 1, dtype=torch.long),
                          weights_TK=torch.ones(len(x_TD), 1))
        for name, value in self.change(len(x_TD)).items():
            setattr(routing, name, value)
        return routing


@pytest.mark.parametrize("change, words", [
    (lambda t: {"expert_ids_TK": torch.zeros(t, 1)}, ["expert_ids_TK", "int64", "torch.float32"]),
    (lambda t: {"expert_ids_TK": torch.zeros(t + 1, 1, dtype=torch.long)}, ["(6, 1)"]),
    (lambda t: {"weights_TK": torch.ones(t, 2)}, ["weights_TK", "(5, 1)", "(5, 2)"]),
    (lambda t: {"probs_TE": torch.ones(t, 3)}, ["probs_TE", "(5, 6)"]),
    (lambda t: {"keep_TK": torch.ones(t, 1)}, ["keep_TK", "bool"]),
    (lambda t: {"expert_ids_TK": torch.full((t, 1), 6)}, ["outside [0, 6)", "6..6"]),
    (lambda t: {"weights_TK": torch.full((t, 1), math.nan)}, ["non-finite"]),
])
def test_a_user_gate_with_a_bad_routing_is_refused(change, words):
    layer = MoELayer(_config(top_k=1), router=BadGate(6, 1, change))
    with pytest.raises(ValueError) as error:
        layer(torch.randn(5, 16))
    for word in words:
        assert word in str(error.value)
