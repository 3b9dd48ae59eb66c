"""Property tests over shapes, K, E, capacity factor and dtype, against the naive reference."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, MoELayer
from moekit.moe import capacity as cap
from reference import capacity_keep, moe_forward

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


@st.composite
def layer_cases(draw):
    num_experts = draw(st.integers(1, 9))
    return dict(
        num_experts=num_experts,
        top_k=draw(st.integers(1, num_experts)),
        hidden=draw(st.sampled_from([8, 16, 24])),
        ffn=draw(st.sampled_from([8, 16, 40])),
        tokens=draw(st.integers(1, 40)),
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.25, 2.0))),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        activation=draw(st.sampled_from(["swiglu", "relu"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_layer_equals_naive_reference(case):
    torch.manual_seed(case["seed"])
    config = MoEConfig(hidden_size=case["hidden"], ffn_size=case["ffn"],
                       num_experts=case["num_experts"], top_k=case["top_k"],
                       capacity_factor=case["capacity_factor"], activation=case["activation"])
    layer = MoELayer(config).to(case["dtype"])
    x = torch.randn(case["tokens"], case["hidden"]).to(case["dtype"])
    with torch.no_grad():
        out, stats = layer(x)
        routing = layer.router(x)
    assert out.shape == x.shape and out.dtype == x.dtype

    keep = None
    if case["capacity_factor"] is not None:
        capacity = cap.expert_capacity(case["tokens"], case["top_k"], case["num_experts"],
                                       case["capacity_factor"])
        keep = capacity_keep(routing.expert_ids_TK, torch.ones_like(routing.expert_ids_TK,
                                                                    dtype=torch.bool),
                             capacity, case["num_experts"])
        assert stats.tokens_per_expert_E.max() <= capacity
    # The reference works in float64 from the same weights and routing.
    layer64 = MoELayer(config).double()
    layer64.load_state_dict(layer.state_dict())
    with torch.no_grad():
        expected = moe_forward(layer64, x.double(), routing.expert_ids_TK,
                               routing.weights_TK.double(), keep)
    scale = expected.abs().max().clamp(min=1.0)
    tolerance = TOLERANCE[case["dtype"]]
    assert float((out.double() - expected).abs().max()) <= 4 * tolerance * float(scale)
    kept = case["top_k"] * case["tokens"] if keep is None else int(keep.sum())
    assert int(stats.tokens_per_expert_E.sum()) == kept
    assert stats.dropped == case["top_k"] * case["tokens"] - kept
