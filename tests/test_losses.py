"""Router losses and the adaptive coefficient against hand computations."""
import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import (AdaptiveAuxCoefficient, router_z_loss, skywork_balance_loss,
                        switch_balance_loss)


def test_switch_balance_loss_by_hand():
    # 4 tokens, 2 experts, top-1: expert 0 chosen 3 times, expert 1 once.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    loss = switch_balance_loss(torch.tensor([3, 1]), probs.sum(0), 4, 1)
    f = [3 / 4, 1 / 4]
    p = [(0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4]
    assert float(loss) == pytest.approx(2 * (f[0] * p[0] + f[1] * p[1]))


def test_switch_balance_loss_is_one_when_uniform():
    for k in (1, 2, 4):
        loss = switch_balance_loss(torch.full((8,), 10 * k), torch.full((8,), 10.0), 80, k)
        assert float(loss) == pytest.approx(1.0)


def test_skywork_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    mean = probs.mean(0).tolist()
    expected = sum((1 / 3 - m) ** 2 for m in mean)
    assert float(skywork_balance_loss(probs.sum(0), 2)) == pytest.approx(expected)


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    lse = [math.log(math.e + math.e ** 2), math.log(2)]
    z_sum = (torch.logsumexp(logits, -1) ** 2).sum()
    assert float(router_z_loss(z_sum, 2)) == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2)


def test_layer_router_loss_combines_coefficients():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=2,
                               aux_loss="skywork", aux_loss_coef=0.5, z_loss_coef=0.25))
    x = torch.randn(10, 8)
    _, stats = layer(x)
    logits = x @ layer.router.weight.detach().T
    probs = logits.softmax(-1)
    aux = ((0.25 - probs.mean(0)) ** 2).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(stats.router_loss.detach(), 0.5 * aux + 0.25 * z)


def test_balance_loss_gradient_reaches_the_router():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=2))
    _, stats = layer(torch.randn(10, 8))
    stats.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_adaptive_coefficient_follows_skywork_rule():
    coef = AdaptiveAuxCoefficient(0.005, xi=0.2, alpha_max=0.01, beta=0.99)
    coef.update(0.02)  # alpha_hat = min(0.2 * 0.02, 0.01) = 0.004
    assert float(coef.value) == pytest.approx(0.99 * 0.005 + 0.01 * 0.004)
    coef.update(0.5)  # alpha_hat capped at 0.01
    assert float(coef.value) == pytest.approx(0.99 * (0.99 * 0.005 + 0.01 * 0.004) + 0.01 * 0.01)


def _dropping_layer(initial):
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1,
                               capacity_factor=1.0, adaptive_aux=True, aux_loss_coef=initial))
    with torch.no_grad():
        layer.router.weight[0] += 3.0
    return layer


def test_adaptive_coefficient_rises_with_drops_and_falls_without():
    x = torch.randn(64, 8).abs()
    layer = _dropping_layer(0.001)
    for _ in range(20):
        _, stats = layer(x)
        layer.update_router_state(stats.counts)  # once per optimizer step
    _, stats = layer(x)
    assert stats.drop_rate > 0.3
    assert stats.aux_coef > 0.001  # high drop rate: alpha_hat = 0.01 pulls it up

    calm = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1,
                              capacity_factor=4.0, adaptive_aux=True, aux_loss_coef=0.01))
    for _ in range(20):
        _, stats = calm(x)
        calm.update_router_state(stats.counts)
    _, stats = calm(x)
    assert stats.drop_rate == 0 and stats.aux_coef < 0.01  # no drops: decays towards 0


def test_a_forward_moves_no_router_state():
    # State moves once per optimizer step (update_router_state), not per forward: a forward
    # recomputed under activation checkpointing, or one per micro-batch, changes nothing.
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1, router="sigmoid",
                       aux_loss="none", capacity_factor=1.0, overflow="recycle_random",
                       adaptive_aux=True, aux_loss_coef=0.003)
    layer = MoELayer(config)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    x = torch.randn(32, 8)
    first, _ = layer(x)
    again, stats = layer(x)
    assert torch.equal(first, again)
    assert all(torch.equal(before[name], t) for name, t in layer.state_dict().items())
    layer.update_router_state(stats.counts)
    assert int(layer.router_step) == 1 and not torch.equal(layer.router.balance_bias,
                                                           before["router.balance_bias"])


def test_adaptive_coefficient_is_fixed_in_dropless_mode_and_eval():
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=1,
                               adaptive_aux=True, aux_loss_coef=0.003))
    layer.update_router_state(layer(torch.randn(16, 8))[1].counts)
    assert float(layer.aux_coefficient.value) == pytest.approx(0.003)
    dropping = _dropping_layer(0.003).eval()
    dropping(torch.randn(16, 8).abs())
    assert float(dropping.aux_coefficient.value) == pytest.approx(0.003)
