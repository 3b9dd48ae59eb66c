"""Capacity, dropping and recycle routing against per-route loops written in the test."""
import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import capacity as cap
from reference import capacity_keep, moe_forward, next_best_recycle


def test_capacity_formula():
    assert cap.expert_capacity(100, 2, 8, 1.0) == 25
    assert cap.expert_capacity(100, 2, 8, 1.25) == math.ceil(31.25)
    assert cap.expert_capacity(3, 1, 8, 1.0) == 1


@pytest.mark.parametrize("seed", range(5))
def test_limit_to_capacity_drops_in_token_order(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5, (40, 2), generator=g)
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 4, (40,), generator=g)) % 5  # distinct per token
    keep = torch.rand(40, 2, generator=g) > 0.1
    got = cap.limit_to_capacity(ids, keep, 10, 5)
    assert torch.equal(got, capacity_keep(ids, keep, 10, 5))


def _skewed_layer(overflow, capacity_factor=1.0, top_k=2):
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=top_k,
                               capacity_factor=capacity_factor, overflow=overflow)).double()
    with torch.no_grad():
        layer.router.weight[0] += 1.0  # expert 0 is popular: it overflows
    return layer


def test_dropping_layer_equals_naive_reference():
    layer = _skewed_layer("drop")
    x = torch.randn(30, 16, dtype=torch.float64).abs()
    out, stats = layer(x)
    routing = layer.router(x)
    capacity = cap.expert_capacity(30, 2, 4, 1.0)
    keep = capacity_keep(routing.expert_ids_TK, torch.ones(30, 2, dtype=torch.bool), capacity, 4)
    expected = moe_forward(layer, x, routing.expert_ids_TK, routing.weights_TK, keep)
    torch.testing.assert_close(out, expected)
    assert stats.dropped == int((~keep).sum()) > 0
    assert stats.drop_rate == pytest.approx(stats.dropped / 60)
    assert stats.tokens_per_expert_E.max() <= capacity


def test_recycle_random_drops_nothing_and_respects_capacity():
    layer = _skewed_layer("recycle_random")
    x = torch.randn(30, 16, dtype=torch.float64).abs()
    _, stats = layer(x)
    capacity = cap.expert_capacity(30, 2, 4, 1.0)
    assert stats.overflowed > 0 and stats.dropped == 0
    assert stats.tokens_per_expert_E.sum() == 60 and stats.tokens_per_expert_E.max() <= capacity


def test_recycle_random_is_the_shuffled_free_slot_rule():
    ids = torch.tensor([[0], [0], [0], [0], [1], [0]])
    keep = torch.ones(6, 1, dtype=torch.bool)
    within = cap.limit_to_capacity(ids, keep, 2, 4)
    overflow = keep & ~within
    new_ids, new_keep = cap.recycle_random(ids, within, overflow, 2, 4,
                                           torch.Generator().manual_seed(7))
    # Free slots in expert order: expert 1 has 1, experts 2 and 3 have 2 each.
    slots = [1, 2, 2, 3, 3]
    shuffled = [slots[i] for i in torch.randperm(5, generator=torch.Generator().manual_seed(7))]
    assert new_ids[:, 0].tolist() == [0, 0, shuffled[0], shuffled[1], 1, shuffled[2]]
    assert new_keep.all()


def test_recycle_random_is_seeded_and_repeatable():
    x = torch.randn(30, 16, dtype=torch.float64).abs()
    torch.manual_seed(3)
    a = _skewed_layer("recycle_random")
    torch.manual_seed(3)
    b = _skewed_layer("recycle_random")
    for _ in range(3):
        torch.testing.assert_close(a(x)[0], b(x)[0])


@pytest.mark.parametrize("seed", range(4))
def test_recycle_next_best_equals_naive_reference(seed):
    torch.manual_seed(seed)
    layer = _skewed_layer("recycle_next_best", capacity_factor=0.8)
    x = torch.randn(25, 16, dtype=torch.float64).abs()
    out, stats = layer(x)
    routing = layer.router(x)
    capacity = cap.expert_capacity(25, 2, 4, 0.8)
    keep = capacity_keep(routing.expert_ids_TK, torch.ones(25, 2, dtype=torch.bool), capacity, 4)
    ids, keep = next_best_recycle(routing.expert_ids_TK, keep, ~keep, capacity, routing.probs_TE)
    expected = moe_forward(layer, x, ids, routing.weights_TK, keep)
    torch.testing.assert_close(out, expected)
    assert stats.dropped == int((~keep).sum())


def test_evaluation_is_dropless_unless_asked():
    layer = _skewed_layer("drop")
    x = torch.randn(30, 16, dtype=torch.float64).abs()
    assert layer(x)[1].dropped > 0
    layer.eval()
    assert layer(x)[1].dropped == 0
    evaluated = MoELayer(MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2,
                                   capacity_factor=1.0, eval_capacity_factor=0.5)).double().eval()
    assert evaluated(x)[1].dropped > 0
