"""One-row bf16 products as W x (``torch.mv``): the same numbers as the products they replace,
taken only where decoding one sequence needs them, and kept whole by a traced step."""
import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer
from moekit.moe import layer as moe_layer
from moekit.moe.row_products import Linear, linear
from reference import moe_forward


@pytest.fixture
def counted_mv(monkeypatch):
    """The number of ``torch.mv`` calls made so far."""
    calls = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or mv(*a))
    return calls


def _within_bf16_rounding(y, exact):
    # bf16 keeps 8 significant bits: each output within a few of its roundings
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -6, atol=2 ** -6 * exact.abs().max())


@torch.no_grad()
def test_one_bf16_row_is_weight_times_row_and_other_products_stay_linear(counted_mv):
    weight, bias = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16()
    row = torch.randn(1, 1, 32).bfloat16()
    y = linear(row, weight, bias)
    assert len(counted_mv) == 1 and y.shape == (1, 1, 48)
    assert torch.equal(y, (torch.mv(weight, row.flatten()) + bias).view(1, 1, 48))
    _within_bf16_rounding(y, F.linear(row.double(), weight.double(), bias.double()))
    counted_mv.clear()
    for x, w in ((torch.randn(2, 32).bfloat16(), weight),  # two rows
                 (row.float(), weight.float()), (row.half(), weight.half())):  # fp32, fp16
        assert torch.equal(linear(x, w), F.linear(x, w))
    assert counted_mv == []


def test_with_autograd_the_product_is_linear_and_has_its_gradients(counted_mv):
    module = Linear(32, 48).bfloat16()
    row = torch.randn(1, 32, dtype=torch.bfloat16, requires_grad=True)
    module(row).sum().backward()
    assert counted_mv == []
    reference = torch.nn.Linear(32, 48).bfloat16()
    reference.load_state_dict(module.state_dict())
    plain_row = row.detach().clone().requires_grad_()
    reference(plain_row).sum().backward()
    assert torch.equal(row.grad, plain_row.grad)
    assert torch.equal(module.weight.grad, reference.weight.grad)


@torch.no_grad()
def test_routed_experts_of_one_bf16_token_multiply_their_own_weights(counted_mv, monkeypatch):
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=24, num_experts=6, top_k=2))
    layer.experts.reset_parameters(0.1)
    x = torch.randn(1, 32)
    routing = layer.router(x)
    exact = moe_forward(layer.double(), x.double(), routing.expert_ids_TK,
                        routing.weights_TK.double())
    layer = layer.bfloat16()
    assert moe_layer.SMALL_BATCH_ROUTES >= 2  # one token's two routes take the routes path
    y = layer(x.bfloat16())[0]
    assert len(counted_mv) == 4  # two routes, each an input and an output product
    _within_bf16_rounding(y, exact)


@torch.no_grad()
def test_a_traced_bf16_row_is_a_sum_over_the_weights_rows(counted_mv):
    # traced (dynamo + AOT autograd) in one graph; inductor fuses the sum into one pass
    weight, row = torch.randn(48, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    traced = torch.compile(linear, backend="aot_eager", fullgraph=True)(row, weight)
    assert counted_mv == []
    assert torch.equal(traced, (weight * row).sum(-1).view(1, 48))
    _within_bf16_rounding(traced, F.linear(row.double(), weight.double()))
