"""The MoE layer end to end against naive references: masks, shared experts, activations,
grouped and module experts, statistics."""
import math

import pytest
import torch
import torch.nn as nn

from moekit import MoEConfig, MoELayer
from moekit.moe import GroupedExperts, ModuleExperts, grouped_linear
from reference import expert_forward, moe_forward


def _layer(**kw):
    base = dict(hidden_size=16, ffn_size=24, num_experts=5, top_k=2)
    base.update(kw)
    return MoELayer(MoEConfig(**base)).double()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_layer_equals_per_token_loop(activation):
    layer = _layer(activation=activation)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = layer(x)
    routing = layer.router(x.view(-1, 16))
    expected = moe_forward(layer, x.view(-1, 16), routing.expert_ids_TK, routing.weights_TK)
    torch.testing.assert_close(out.view(-1, 16), expected)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_are_added(gated):
    layer = _layer(num_shared_experts=2, shared_ffn_size=8, shared_expert_gate=gated)
    assert layer.shared_experts.up_proj.out_features == 16  # 2 shared experts of width 8
    x = torch.randn(7, 16, dtype=torch.float64)
    out, _ = layer(x)
    routing = layer.router(x)
    routed = moe_forward(layer, x, routing.expert_ids_TK, routing.weights_TK)
    s = layer.shared_experts
    shared = (torch.nn.functional.silu(x @ s.gate_proj.weight.T) * (x @ s.up_proj.weight.T)) \
        @ s.down_proj.weight.T
    if gated:
        shared = torch.sigmoid(x @ layer.shared_gate.weight.T) * shared
    torch.testing.assert_close(out, routed + shared)


def test_padding_never_counts():
    layer = _layer(capacity_factor=1.0)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    out, stats = layer(x, mask)
    valid = x[mask]
    out_valid, stats_valid = layer(valid)
    torch.testing.assert_close(out[mask], out_valid)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert stats.num_tokens == 11
    assert torch.equal(stats.tokens_per_expert_E, stats_valid.tokens_per_expert_E)
    assert stats.dropped == stats_valid.dropped
    torch.testing.assert_close(stats.aux_loss, stats_valid.aux_loss)
    # Garbage in the padded positions changes nothing.
    x2 = x.clone()
    x2[~mask] = 1e6
    torch.testing.assert_close(layer(x2, mask)[0], out)


def test_all_padding_gives_zeros_and_empty_stats():
    layer = _layer()
    out, stats = layer(torch.randn(3, 16, dtype=torch.float64), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(3, 16, dtype=torch.float64))
    assert stats.num_tokens == 0 and stats.drop_rate == 0.0


def test_statistics_by_hand():
    layer = _layer(num_experts=4)
    x = torch.randn(12, 16, dtype=torch.float64)
    _, stats = layer(x)
    probs = torch.softmax(x @ layer.router.weight.detach().T, -1)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    top = probs.topk(3, -1).values
    assert stats.router_entropy == pytest.approx(entropy)
    assert stats.max1_over_max2 == pytest.approx(float((top[:, 0] / top[:, 1]).mean()))
    assert stats.max2_over_max3 == pytest.approx(float((top[:, 1] / top[:, 2]).mean()))
    chosen = probs.topk(2, -1).indices.flatten()
    assert stats.tokens_per_expert_E.tolist() == torch.bincount(chosen, minlength=4).tolist()
    torch.testing.assert_close(stats.prob_sum_E.detach(), probs.sum(0))
    assert stats.expert_load.sum().item() == pytest.approx(1.0)
    assert 0 < stats.router_entropy <= math.log(4)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_grouped_mm_path_equals_fallback_forward_and_backward(activation):
    """fp32 with aligned sizes takes torch's grouped_mm; float64 takes the per-block fallback."""
    experts = GroupedExperts(6, 32, 64, activation)
    counts = torch.tensor([5, 0, 9, 1, 0, 17])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    y = experts(x, counts)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    grads = [x.grad] + [p.grad for p in experts.parameters()]
    ref = GroupedExperts(6, 32, 64, activation).double()
    ref.load_state_dict(experts.state_dict())
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, counts)
    y64.backward(upstream.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, [x64.grad] + [p.grad for p in ref.parameters()]):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_grouped_linear_equals_block_products():
    w_EOI = torch.randn(3, 32, 16)
    counts = torch.tensor([4, 0, 6])
    x = torch.randn(10, 16)
    expected = torch.cat([x[:4] @ w_EOI[0].T, x[4:10] @ w_EOI[2].T])
    torch.testing.assert_close(grouped_linear(x, w_EOI, counts), expected)


def test_module_experts_take_any_module():
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=3, top_k=2)
    modules = [nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8)),
               nn.Identity()]
    layer = MoELayer(config, experts=ModuleExperts(modules)).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    routing = layer.router(x)
    expected = torch.zeros_like(x)
    for t in range(10):
        for k in range(2):
            e = int(routing.expert_ids_TK[t, k])
            expected[t] += routing.weights_TK[t, k] * layer.experts.experts[e](x[t:t + 1])[0]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert modules[1][0].weight.grad is not None


def test_module_experts_equal_grouped_experts_with_same_weights():
    config = MoEConfig(hidden_size=16, ffn_size=24, num_experts=4, top_k=2)
    grouped = MoELayer(config).double()
    mlps = []
    for e in range(4):
        w_in, w_out = grouped.experts.gate_up_proj[e], grouped.experts.down_proj[e]
        mlps.append(_FixedSwiGLU(w_in.detach().clone(), w_out.detach().clone()))
    moduled = MoELayer(config, experts=ModuleExperts(mlps), router=grouped.router).double()
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(moduled(x)[0], grouped(x)[0])


class _FixedSwiGLU(nn.Module):
    def __init__(self, w_in, w_out):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(w_in), nn.Parameter(w_out)

    def forward(self, x):
        gate, up = (x @ self.w_in.T).chunk(2, -1)
        return (torch.nn.functional.silu(gate) * up) @ self.w_out.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["grouped_mm", "fallback"])
def test_expert_weights_enter_the_graph_once(dtype):
    """No per-expert full-size gradient: each stacked weight feeds exactly one backward node,
    so its gradient is built once (indexing w[e] per expert would add one node per expert)."""
    experts = GroupedExperts(8, 32, 64).to(dtype)
    x = torch.randn(32, 32, dtype=dtype, requires_grad=True)
    out = experts(x, torch.full((8,), 4))
    users = {id(p): 0 for p in experts.parameters()}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in users:
                users[id(variable)] += 1
            stack.append(child)
    assert list(users.values()) == [1, 1]


def test_expert_output_from_weights_directly():
    layer = _layer(num_experts=3, top_k=1)
    x = torch.randn(16, dtype=torch.float64)
    e = int(layer.router(x[None]).expert_ids_TK[0, 0])
    w = float(layer.router(x[None]).weights_TK[0, 0].detach())
    torch.testing.assert_close(layer(x[None])[0][0], w * expert_forward(layer.experts, e, x))


def test_grouped_experts_alone_take_any_gradient():
    """`.sum().backward()` hands grouped_mm an expanded (stride-0) gradient; the experts must
    still give the gradients of a per-expert loop."""
    from moekit import GroupedExperts
    experts = GroupedExperts(4, 16, 8)
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 3, 0, 4])
    experts(x, counts).sum().backward()

    x_ref = x.detach().requires_grad_()
    gate_up = experts.gate_up_proj.detach().clone().requires_grad_()
    down = experts.down_proj.detach().clone().requires_grad_()
    silu = torch.nn.functional.silu
    loop = torch.cat([(silu(block @ w[:8].T) * (block @ w[8:].T)) @ d.T
                      for block, w, d in zip(x_ref.split(counts.tolist()), gate_up, down)])
    loop.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(experts.gate_up_proj.grad, gate_up.grad)
    torch.testing.assert_close(experts.down_proj.grad, down.grad)


# GShard's random second choice drops routes in training, which needs counts on the host.
@pytest.mark.parametrize("training, router", [
    (training, router) for training in (True, False)
    for router in ({}, dict(router="noisy", aux_loss="none"), dict(router="zero"))
] + [(False, dict(router="gshard", aux_loss="none"))])
def test_a_dropless_step_never_reads_a_value_back_from_the_device(training, router):
    # On a GPU each such read (item, tolist, bool, nonzero, bincount, ...) stalls the host
    # until the device catches up; a dropless layer needs none, in forward or backward.
    from torch.overrides import TorchFunctionMode
    reads = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.bincount, torch.bincount, torch.unique, torch.masked_select}
    seen = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in reads:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=32, num_experts=4, top_k=2,
                               num_shared_experts=1, z_loss_coef=1e-3, **router)).train(training)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with Reads():
        y, stats = layer(x)
        (y.sum() + stats.router_loss).backward()
    assert seen == []
    assert stats.dropped == 0  # read when asked, not before
    assert router.get("router") == "zero" or stats.router_entropy > 0


def test_under_cpu_autocast_the_experts_keep_their_weights_dtype():
    # A bf16 input (as autocast's linears produce) is multiplied in the weights' fp32 on a CPU,
    # where bf16 grouped kernels are recompiled for every new row count.
    experts = GroupedExperts(3, 16, 16)
    x = torch.randn(10, 16).bfloat16()
    counts = torch.tensor([4, 0, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, counts)
    assert y.dtype == torch.float32
    expert_of_row = [0] * 4 + [2] * 6
    with torch.no_grad():
        expected = torch.stack([expert_forward(experts, e, row)
                                for e, row in zip(expert_of_row, x.float())])
    torch.testing.assert_close(y.detach(), expected)
    y.sum().backward()
    assert experts.gate_up_proj.grad[1].abs().sum() == 0 < experts.gate_up_proj.grad[0].abs().sum()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_under_cuda_autocast_the_experts_compute_in_bf16():
    experts = GroupedExperts(3, 16, 16).cuda()
    x = torch.randn(10, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = experts(x, torch.tensor([4, 0, 6], device="cuda"))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32


def test_a_dtype_mismatch_outside_autocast_is_named():
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=32, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"hidden is torch.bfloat16 and the layer's weights are "
                                         r"torch.float32: cast one to the other"):
        layer(torch.randn(3, 16, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes itself
        assert layer(torch.randn(3, 16, dtype=torch.bfloat16))[0].isfinite().all()
