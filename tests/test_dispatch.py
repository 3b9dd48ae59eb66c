"""Permute / un-permute against naive per-route loops, forward and backward."""
import pytest
import torch

from moekit.moe.dispatch import permute, plan_dispatch, unpermute


def _random_routes(tokens, top_k, experts, drop):
    """Random expert choices, ~30% of the routes dropped when drop; and their plan."""
    expert_ids = torch.randint(0, experts, (tokens, top_k))
    keep = torch.rand(tokens, top_k) > 0.3 if drop else None
    return expert_ids, keep, plan_dispatch(expert_ids, keep, experts)


@pytest.mark.parametrize("drop", [False, True])
def test_permute_and_unpermute_match_loops(drop):
    tokens, top_k, experts, hidden = 40, 2, 5, 6
    expert_ids, keep, plan = _random_routes(tokens, top_k, experts, drop)
    kept = [(t, k) for t in range(tokens) for k in range(top_k) if keep is None or keep[t, k]]
    # naive: routes sorted by expert, token order within an expert
    order = sorted(kept, key=lambda route: (expert_ids[route].item(), route[0]))
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    x_ND = permute(x, plan)
    assert torch.equal(x_ND, torch.stack([x[t] for t, _ in order]))
    assert plan.tokens_per_expert_E.tolist() == [
        sum(expert_ids[r].item() == e for r in kept) for e in range(experts)]

    weights = torch.rand(tokens, top_k, dtype=torch.float64, requires_grad=True)
    y_ND = torch.randn(len(order), hidden, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for row, (t, k) in enumerate(order):
        expected[t] += weights[t, k] * y_ND[row]
    torch.testing.assert_close(unpermute(y_ND, weights, plan), expected)

    grad_ND = torch.randn_like(x_ND)
    x_ND.backward(grad_ND)
    expected_grad = torch.zeros_like(x)
    for row, (t, _) in enumerate(order):
        expected_grad[t] += grad_ND[row]
    torch.testing.assert_close(x.grad, expected_grad)
    assert torch.autograd.gradcheck(lambda x, y, w: unpermute(permute(x, plan) * y, w, plan),
                                    (x.detach().requires_grad_(), y_ND, weights))


@pytest.mark.parametrize("drop", [False, True])
def test_unpermute_gradients_match_loops_for_a_summed_output(drop):
    # .sum().backward() hands on a stride-0 gradient; the combine's own backward must take it.
    tokens, top_k, experts, hidden = 30, 3, 4, 5
    _, _, plan = _random_routes(tokens, top_k, experts, drop)
    y_ND = torch.randn(len(plan.slots_N), hidden, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens, top_k, dtype=torch.float64, requires_grad=True)
    unpermute(y_ND, weights, plan).sum().backward()

    expected_y = torch.zeros_like(y_ND)
    expected_w = torch.zeros_like(weights)
    for row, slot in enumerate(plan.slots_N.tolist()):
        t, k = divmod(slot, top_k)
        expected_y[row] = weights[t, k].detach()
        expected_w[t, k] = y_ND[row].detach().sum()
    torch.testing.assert_close(y_ND.grad, expected_y)
    torch.testing.assert_close(weights.grad, expected_w)
