"""Group-limited top-k and the routed scaling factor (DeepSeek-V2/V3, GLM4-MoE), against a naive
loop written here and against transformers' own routers and MoE blocks."""
import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe import MoELayer
from moekit.moe.router import build_gate


def _naive_route(x_TD, weight_ED, bias_E, top_k, n_group, topk_group, sigmoid, normalize,
                 factor):
    """Token by token, expert by expert, in float64: (set of ids, {id: weight}) per token."""
    routes = []
    num_experts = len(weight_ED)
    per_group = num_experts // n_group
    for x_D in x_TD.double():
        logits = [float(weight_ED[e].double() @ x_D) for e in range(num_experts)]
        if sigmoid:
            scores = [1 / (1 + math.exp(-z)) for z in logits]
        else:
            top = max(logits)
            exps = [math.exp(z - top) for z in logits]
            scores = [v / sum(exps) for v in exps]
        choice = [scores[e] + float(bias_E[e]) for e in range(num_experts)]
        group_scores = []
        for g in range(n_group):
            members = sorted(choice[g * per_group:(g + 1) * per_group], reverse=True)
            group_scores.append(members[0] + members[1] if sigmoid else members[0])
        best_groups = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
        eligible = [e for e in range(num_experts) if e // per_group in best_groups]
        chosen = sorted(eligible, key=lambda e: -choice[e])[:top_k]
        total = sum(scores[e] for e in chosen)
        routes.append({e: (scores[e] / total if normalize else scores[e]) * factor
                       for e in chosen})
    return routes


@pytest.mark.parametrize("router, normalize", [("softmax", False), ("sigmoid", True),
                                               ("sigmoid", False)])
def test_group_limited_top_k_matches_a_naive_loop(router, normalize):
    torch.manual_seed(0)
    options = {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}
    config = MoEConfig(hidden_size=16, ffn_size=8, num_experts=16, top_k=3, router=router,
                       normalize_weights=normalize, router_options=options)
    gate = build_gate(config).double()
    bias_E = torch.zeros(16, dtype=torch.float64)
    if router == "sigmoid":
        bias_E = torch.randn(16, dtype=torch.float64) * 0.3  # moves the choice, not the weights
        gate.balance_bias.copy_(bias_E)
    x_TD = torch.randn(50, 16, dtype=torch.float64)
    routing = gate(x_TD)
    expected = _naive_route(x_TD, gate.weight.detach(), bias_E, 3, 4, 2, router == "sigmoid",
                            normalize, 2.5)
    for ids, weights, want in zip(routing.expert_ids_TK.tolist(), routing.weights_TK.tolist(),
                                  expected):
        assert set(ids) == set(want)
        for expert, value in zip(ids, weights):
            assert value == pytest.approx(want[expert], rel=1e-12)
    # The limit matters on this input: some tokens' best experts overall lie outside their
    # best groups, so an unlimited gate routes them elsewhere.
    free = build_gate(MoEConfig(hidden_size=16, ffn_size=8, num_experts=16, top_k=3,
                                router=router, normalize_weights=normalize,
                                router_options={"routed_scaling_factor": 2.5})).double()
    free.load_state_dict(gate.state_dict())
    assert not torch.equal(free(x_TD).expert_ids_TK.sort(-1).values,
                           routing.expert_ids_TK.sort(-1).values)


def test_routed_scaling_factor_scales_the_routed_output_only():
    torch.manual_seed(1)
    base = dict(hidden_size=16, ffn_size=8, num_experts=8, top_k=2, num_shared_experts=1)
    plain = MoELayer(MoEConfig(**base)).eval()
    scaled = MoELayer(MoEConfig(**base, router_options={"routed_scaling_factor": 2.5})).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(30, 16)
    shared = plain.shared_experts(x)
    torch.testing.assert_close(scaled(x)[0] - shared, 2.5 * (plain(x)[0] - shared))


@pytest.mark.parametrize("options, message", [
    ({"n_group": 3}, "n_group=3 is not allowed: it must divide num_experts (16)"),
    ({"n_group": 4, "topk_group": 5}, "topk_group=5 is not allowed: at most n_group (4)"),
    ({"n_group": 8, "topk_group": 1}, "top_k=3 is not allowed with router_options "
                                      "topk_group=1 of n_group=8"),
    ({"n_group": 2.0}, "n_group=2.0 is not allowed: expected an integer >= 1"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor=0 is not allowed"),
])
def test_bad_group_options_are_refused(options, message):
    with pytest.raises(ValueError) as error:
        MoELayer(MoEConfig(hidden_size=16, ffn_size=8, num_experts=16, top_k=3,
                           router_options=options))
    assert message in str(error.value)


transformers = pytest.importorskip("transformers")


def _hf_block(family):
    common = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                  num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
                  routed_scaling_factor=2.5)
    if family == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        config = transformers.DeepseekV2Config(topk_method="group_limited_greedy", **common)
        return DeepseekV2Moe(config), dict(router="softmax", normalize_weights=False)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    config = transformers.DeepseekV3Config(norm_topk_prob=True, **common)
    return DeepseekV3MoE(config), dict(router="sigmoid", normalize_weights=True)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_layer_equals_the_deepseek_moe_block(family):
    """DeepSeek's block: group-limited routing, scaled routed output, two shared experts as one
    MLP of twice the width; V3's correction bias moves the choice only."""
    torch.manual_seed(2)
    block, router = _hf_block(family)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.3)
        if family == "deepseek_v3":
            block.gate.e_score_correction_bias.normal_(0, 0.3)
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=16, num_experts=16, top_k=4,
                               num_shared_experts=1, shared_ffn_size=32,
                               router_options={"n_group": 4, "topk_group": 2,
                                               "routed_scaling_factor": 2.5}, **router)).eval()
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        if family == "deepseek_v3":
            layer.router.balance_bias.copy_(block.gate.e_score_correction_bias)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
        layer.shared_experts.load_state_dict(block.shared_experts.state_dict())
    x = torch.randn(2, 25, 32)
    torch.testing.assert_close(layer(x)[0], block(x), rtol=1e-5, atol=1e-5)
