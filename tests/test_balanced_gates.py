"""BASE layers' exact balanced assignment against scipy's linear_sum_assignment, the BASE gate's
output mixing by hand, and S-BASE (Sinkhorn) against Megatron's formula and a load bound."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moekit import Gate, MoEConfig, MoELayer, Routing
from moekit.moe import balanced_assignment, build_gate
from reference import expert_forward


def scipy_balanced_assignment(scores_TE):
    """The balanced problem as a square assignment for scipy: expert e has floor(T/E) slots that
    a token must fill and one more slot, and E - T mod E phantom tokens may take only those
    'one more' slots, so that exactly T mod E experts get ceil(T/E) tokens."""
    num_tokens, num_experts = scores_TE.shape
    share, extras = divmod(num_tokens, num_experts)
    cost = np.zeros((num_tokens + num_experts - extras, num_experts * (share + 1)))
    for e in range(num_experts):
        for slot in range(share + 1):
            column = e * (share + 1) + slot
            cost[:num_tokens, column] = -scores_TE[:, e]
            cost[num_tokens:, column] = 0.0 if slot == share else 1e12
    rows, columns = linear_sum_assignment(cost)
    experts = np.full(num_tokens, -1)
    for row, column in zip(rows, columns):
        if row < num_tokens:
            experts[row] = column // (share + 1)
    return experts


@pytest.mark.parametrize("num_tokens, num_experts, skew", [
    (12, 4, 0.0), (12, 4, 3.0), (37, 6, 0.0), (37, 6, 4.0), (3, 5, 1.0), (200, 8, 3.0),
    (61, 16, 2.0),
])
def test_balanced_assignment_is_the_optimum_scipy_finds(num_tokens, num_experts, skew):
    generator = torch.Generator().manual_seed(num_tokens * num_experts)
    scores = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    scores[:, 0] += skew  # most tokens prefer expert 0: the assignment must move them
    ours = balanced_assignment(scores).numpy()
    reference = scipy_balanced_assignment(scores.numpy())
    assert np.array_equal(ours, reference)  # a unique optimum for continuous random scores
    loads = np.bincount(ours, minlength=num_experts)
    share, extras = divmod(num_tokens, num_experts)
    assert sorted(loads.tolist()) == [share] * (num_experts - extras) + [share + 1] * extras


def test_balanced_assignment_of_float32_scores_on_their_device():
    scores = torch.randn(20, 4)
    ids = balanced_assignment(scores)
    assert ids.dtype == torch.long and ids.device == scores.device
    assert np.array_equal(ids.numpy(), scipy_balanced_assignment(scores.double().numpy()))


def _base_layer(**kw):
    return MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1, router="base",
                              aux_loss="none", **kw)).double()


def test_base_layer_trains_on_the_balanced_assignment_and_mixes_its_input():
    layer = _base_layer()
    x = torch.randn(10, 8, dtype=torch.float64)  # 10 tokens over 4 experts: loads 3, 3, 2, 2
    out, stats = layer(x)
    centroids = layer.router.weight.detach()
    affinity = x @ centroids.T
    experts = scipy_balanced_assignment(affinity.numpy())
    expected = []
    for t in range(10):
        e = int(experts[t])
        gate = 1 / (1 + math.exp(-float(affinity[t, e])))
        expected.append(gate * expert_forward(layer.experts, e, x[t]) + (1 - gate) * x[t])
    torch.testing.assert_close(out, torch.stack(expected))
    assert sorted(stats.tokens_per_expert_E.tolist()) == [2, 2, 3, 3]
    assert stats.dropped == 0 and stats.overflowed == 0
    out.sum().backward()  # the centroids learn through the sigmoid mixing
    assert layer.router.weight.grad.abs().sum() > 0


def test_base_layer_evaluates_greedily():
    layer = _base_layer().eval()
    x = torch.randn(9, 8, dtype=torch.float64)
    x[:, :] += 3 * layer.router.weight.detach()[2]  # every token prefers expert 2
    out, stats = layer(x)
    affinity = x @ layer.router.weight.detach().T
    assert stats.tokens_per_expert_E.tolist() == [0, 0, 9, 0]
    gate = torch.sigmoid(affinity[:, 2:3])
    expected = torch.stack([expert_forward(layer.experts, 2, row) for row in x])
    torch.testing.assert_close(out, gate * expected + (1 - gate) * x)
    assert sorted(layer.train()(x)[1].tokens_per_expert_E.tolist()) == [2, 2, 2, 3]


def megatron_sinkhorn(cost, tol=0.0001):
    """Megatron-LM's sinkhorn (megatron/core/transformer/moe/moe_utils.py), as it is there."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps = 0.00000001
    error = 1e9
    d1_old = d1
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sinkhorn_gate_is_megatrons_and_its_max_load_is_within_the_bound(top_k):
    config = MoEConfig(hidden_size=4, ffn_size=8, num_experts=4, top_k=top_k, router="sinkhorn",
                       aux_loss="none")
    gate = build_gate(config).double()
    with torch.no_grad():
        gate.weight.copy_(4 * torch.eye(4))  # logits = 4 x: sharp, and skewed to expert 0
    num_tokens = 64
    x = torch.randn(num_tokens, 4, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    x[:, 0] += 2
    routing = gate(x)
    logits = 4 * x
    plan = megatron_sinkhorn(logits)
    assert torch.equal(routing.expert_ids_TK, plan.topk(top_k, -1).indices)
    scores = torch.sigmoid(logits) if top_k == 1 else torch.softmax(logits, -1)
    torch.testing.assert_close(routing.weights_TK, scores.gather(-1, routing.expert_ids_TK))
    if top_k == 1:
        # Bound (docs/moe.md): load_e <= T * colsum_e + sum over t of max(0, 1 - T * P[t, a_t]),
        # P the plan, a_t the token's expert; a plan whose rows are one-hot gives T / E.
        chosen = routing.expert_ids_TK[:, 0]
        rounding = (1 - num_tokens * plan[torch.arange(num_tokens), chosen]).clamp(min=0).sum()
        bound = num_tokens * float(plan.sum(0).max()) + float(rounding)
        loads = torch.bincount(chosen, minlength=4)
        greedy = torch.bincount(logits.argmax(-1), minlength=4)
        assert int(loads.max()) <= bound < int(greedy.max())  # greedy top-1 would break it
    gate.eval()
    assert torch.equal(gate(x).expert_ids_TK, scores.topk(top_k, -1).indices)


@pytest.mark.parametrize("change, words", [
    (dict(router="base", top_k=2, aux_loss="none"), ["top_k=2", "exactly 1 expert"]),
    (dict(router="base", top_k=1), ["aux_loss='switch'", "balances by its assignment"]),
    (dict(router="sinkhorn"), ["aux_loss='switch'", '"sinkhorn" router']),
])
def test_bad_balanced_gate_config_is_refused(change, words):
    with pytest.raises(ValueError) as error:
        MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, **change)
    for word in words:
        assert word in str(error.value)


def test_bad_sinkhorn_option_is_refused():
    with pytest.raises(ValueError, match=r"tolerance=-1.0.*finite number >= 0"):
        MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, router="sinkhorn",
                           aux_loss="none", router_options={"tolerance": -1.0}))


class MixingGate(Gate):
    """Token t -> expert 0 with weight 1, and its own input weighted by ``input_weights``."""

    def __init__(self, input_weights):
        super().__init__(num_experts=4, top_k=1)
        self.input_weights = input_weights

    def forward(self, x_TD):
        return Routing(torch.zeros(len(x_TD), 1, dtype=torch.long),
                       torch.ones(len(x_TD), 1, dtype=x_TD.dtype),
                       input_weights_T=self.input_weights(len(x_TD)))


def test_a_user_gate_mixes_the_input_into_the_output():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1),
                     router=MixingGate(lambda t: torch.full((t,), 0.25)))
    x = torch.randn(5, 8)
    expected = torch.stack([expert_forward(layer.experts, 0, row) for row in x]) + 0.25 * x
    torch.testing.assert_close(layer(x)[0], expected)


@pytest.mark.parametrize("input_weights, words", [
    (lambda t: torch.ones(t, 1), ["input_weights_T", f"({5},)", "(5, 1)"]),
    (lambda t: torch.full((t,), math.inf), ["input_weights_T has non-finite"]),
])
def test_a_user_gate_with_bad_input_weights_is_refused(input_weights, words):
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1),
                     router=MixingGate(input_weights))
    with pytest.raises(ValueError) as error:
        layer(torch.randn(5, 8))
    for word in words:
        assert word in str(error.value)


def test_base_layer_balances_the_valid_tokens_only():
    layer = _base_layer()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 3:] = False  # 10 valid tokens over 4 experts: 3, 3, 2, 2
    out, stats = layer(x, mask)
    assert sorted(stats.tokens_per_expert_E.tolist()) == [2, 2, 3, 3]
    assert out[~mask].abs().sum() == 0
    torch.testing.assert_close(out[mask], layer(x[mask])[0])
