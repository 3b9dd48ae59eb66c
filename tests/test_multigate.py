"""MultiGateMoE (MMoE) against a token-by-token computation of the paper's formula."""
import math

import pytest
import torch
import torch.nn as nn

from moekit import MoEConfig, ModuleExperts
from moekit.moe import MultiGateMoE
from reference import expert_forward


def _config(**kw):
    return MoEConfig(**{**dict(hidden_size=8, ffn_size=16, num_experts=3), **kw})


def _by_hand(model, x_TD, expert_of):
    """tower_k(sum_e softmax(W_k x)_e expert_e(x)), one token at a time."""
    outputs = []
    for gate, tower in zip(model.gates, model.towers):
        rows = []
        for x_D in x_TD:
            g = torch.softmax(gate.weight @ x_D, -1)
            rows.append(tower(sum(g[e] * expert_of(e, x_D) for e in range(len(g)))[None])[0])
        outputs.append(torch.stack(rows))
    return outputs


def test_each_task_mixes_the_shared_experts_with_its_own_gate():
    towers = [nn.Linear(8, 1), nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))]
    model = MultiGateMoE(_config(), num_tasks=2, towers=towers).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    outputs, stats = model(x)
    expected = _by_hand(model, x.view(-1, 8), lambda e, x_D: expert_forward(model.experts, e, x_D))
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 1), (2, 5, 2)]
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out.view(10, -1), want)
    for gate, stat in zip(model.gates, stats):
        probs = torch.softmax(x.view(-1, 8) @ gate.weight.detach().T, -1).float()
        torch.testing.assert_close(stat.prob_sum_E.detach(), probs.sum(0))
        entropy = -(probs * probs.log()).sum(-1).mean()
        assert math.isclose(stat.router_entropy, float(entropy), rel_tol=1e-5)
        assert stat.tokens_per_expert_E.tolist() == [10, 10, 10] and stat.dropped == 0
    outputs[0].sum().backward()  # task 0's loss trains gate 0 and the experts, not gate 1
    assert model.gates[0].weight.grad.abs().sum() > 0 and model.gates[1].weight.grad is None
    assert model.experts.down_proj.grad.abs().sum() > 0


def test_module_experts_and_a_padding_mask():
    experts = ModuleExperts([nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.GELU())])
    model = MultiGateMoE(_config(), num_tasks=3, experts=experts)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    outputs, stats = model(x, mask)
    expected = _by_hand(model, x[mask], lambda e, x_D: experts.experts[e](x_D[None])[0])
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out[mask], want)
        assert out[~mask].abs().sum() == 0
    assert all(s.num_tokens == 6 for s in stats)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_tasks=0), ["num_tasks=0", "positive integer"]),
    (dict(num_tasks=2.0), ["num_tasks=2.0", "positive integer"]),
    (dict(num_tasks=2, towers=[nn.Identity()]), ["towers has 1", "num_tasks=2"]),
    (dict(num_tasks=2, config=_config(router="sigmoid")), ["router='sigmoid'", "dense softmax"]),
    (dict(num_tasks=2, config=_config(capacity_factor=1.0)), ["capacity_factor=1.0"]),
    (dict(num_tasks=1, experts=ModuleExperts([nn.Identity()])), ["num_experts=1", "agree"]),
])
def test_bad_multigate_input_is_refused(kwargs, words):
    kwargs = {"config": _config(), **kwargs}
    with pytest.raises(ValueError) as error:
        MultiGateMoE(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_the_synthetic_benchmark_runs_and_measures_the_label_correlation(tmp_path, capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "mmoe_synthetic.py"
    spec = importlib.util.spec_from_file_location("mmoe_synthetic", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    setting = example.draw_setting(4000, torch.Generator().manual_seed(0))
    # p = 1: the tasks share w and differ by their noise alone (variance 0.01); the label
    # correlation falls with p, though not to p (the sines bend it).
    correlations = [float(torch.corrcoef(example.labels(setting, p).T)[0, 1])
                    for p in example.CORRELATIONS]
    noise_share = 0.01 / float(example.labels(setting, 1.0).var(0).mean())
    assert correlations[0] == pytest.approx(1 - noise_share, abs=0.01)
    assert correlations == sorted(correlations, reverse=True)
    plot = tmp_path / "mmoe.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs: tiny models, where threads only wait
    try:
        assert example.main(["--seeds", "2", "--steps", "3", "--examples", "300",
                             "--plot", str(plot)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "MMoE degrades least as p falls:" in out and plot.read_bytes()[:4] == b"\x89PNG"
    assert example.main(["--plot", str(plot)]) == 2  # not overwritten without --overwrite
    assert "--plot" in capsys.readouterr().err
