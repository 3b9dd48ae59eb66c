"""Expert parallelism at the layer: the all-to-all dispatcher gives every token the output and
every expert the gradient that one process with all experts gives (the model-level matrix is
in test_equivalence.py). Real gloo processes, float64."""
import torch
import torch.nn as nn

from moekit import MoEConfig, MoELayer, ModuleExperts
from moekit.parallel.expert_parallel import expert_parameters, shard_experts
from moekit.parallel.processes import run_on_ranks

CONFIG = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2)


def _layer():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16)) for _ in range(4)]
    return MoELayer(CONFIG, experts=ModuleExperts(experts)).double()


def _tokens():
    return torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _shard_forward_backward(rank, world):
    import torch.distributed as dist
    layer = _layer()
    shard_experts(layer, dist.group.WORLD, rank, world)
    x = _tokens().chunk(world)[rank].requires_grad_()
    y, _ = layer(x)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad,
            "experts": {name: p.grad for name, p in expert_parameters(layer)},
            "router": layer.router.weight.grad}


def test_module_experts_under_expert_parallelism_equal_one_process():
    reference = _layer()
    x = _tokens().requires_grad_()
    y, _ = reference(x)
    y.pow(2).sum().backward()
    ranks = run_on_ranks(_shard_forward_backward, 2)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(sum(r["router"] for r in ranks), reference.router.weight.grad)
    for rank, outcome in enumerate(ranks):  # rank r holds experts 2r and 2r + 1, renumbered
        for name, grad in outcome["experts"].items():
            local, rest = name.removeprefix("experts.experts.").split(".", 1)
            expert = 2 * rank + int(local)
            want = dict(reference.named_parameters())[f"experts.experts.{expert}.{rest}"].grad
            torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
