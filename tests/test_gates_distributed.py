"""Gates over several ranks (SWIPE, the topology gate) and capacities counted over every rank,
on 2 and 4 gloo processes against one process holding the whole batch: naive loops over the
whole batch are the references (the rank blocks being the batch's consecutive rows)."""
import math
import re

import pytest
import torch

from moekit import Gate, MoEConfig, MoELayer, Routing
from moekit.parallel.processes import run_on_ranks

TOKENS = 16  # per rank


def _tokens(world):
    return torch.randn(TOKENS * world, 8, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def _layer(world, **config):
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=2 * world, top_k=2,
                       router_options={"bias": True, **config.pop("router_options", {})},
                       **config)
    layer = MoELayer(config).double()
    with torch.no_grad():  # the last experts are favoured: capacities and caps bite
        layer.router.bias.copy_(torch.linspace(0, 2, config.num_experts))
    return layer


class FixedRoutes(Gate):
    """The routes given, weighted as SWIPE and the topology gate weigh theirs: the one-process
    reference of a layer whose gate rerouted over ranks."""

    def __init__(self, gate, expert_ids_TK):
        super().__init__(gate.num_experts, gate.top_k)
        self.gate, self.expert_ids_TK = gate, expert_ids_TK

    def forward(self, x_TD):
        logits_TE = self.gate.logits(x_TD)
        return Routing(self.expert_ids_TK, logits_TE.gather(1, self.expert_ids_TK).softmax(-1))


def _on_ranks(rank, world, configs):
    import torch.distributed as dist

    from moekit.config import ExpertParallelConfig
    from moekit.parallel.expert_parallel import shard_experts
    from moekit.parallel.mesh import world_mesh
    from moekit.parallel.parallelize import hand_route_groups
    mesh = world_mesh(expert=world)
    outcomes = []
    for config in configs:
        layer = _layer(world, **config).train()
        hand_route_groups(layer, mesh)
        if config.get("router") in ("swipe", "topology"):  # their experts spread, as in use
            shard_experts(layer, dist.group.WORLD, rank, world,
                          options=ExpertParallelConfig(overlap=True))
        x = _tokens(world)[mesh.rows(TOKENS * world)]
        routing = layer.router(x)
        y, stats = layer(x)
        outcomes.append({"ids": routing.expert_ids_TK, "weights": routing.weights_TK.detach(),
                         "y": y.detach(), "dropped": stats.dropped})
    return outcomes


CAPACITY = [dict(capacity_factor=0.75, capacity_scope="ranks"),
            dict(router="gshard", aux_loss="none", capacity_factor=0.75, capacity_scope="ranks",
                 router_options={"random_routing": False})]


def swipe_reference(logits, world, top_k):
    """FastMoE's SWIPE as the docs state it, one route at a time."""
    per_worker = logits.shape[1] // world
    ids = logits.topk(top_k).indices.tolist()
    room, used, over = [TOKENS * top_k] * world, [0] * world, []
    for t, row in enumerate(ids):
        for k, expert in enumerate(row):
            worker = expert // per_worker
            if used[worker] < room[worker]:
                used[worker] += 1
            else:
                over.append((t, k))
    for t, k in over:
        worker = next(w for w in range(world) if used[w] < room[w])
        used[worker] += 1
        block = logits[t, worker * per_worker:(worker + 1) * per_worker]
        ids[t][k] = worker * per_worker + int(block.argmax())
    return torch.tensor(ids), len(over)


def topology_reference(logits, world, top_k, fraction, ranks_per_node):
    per_rank = logits.shape[1] // world
    per_node = per_rank * ranks_per_node
    ids = logits.topk(top_k).indices.tolist()
    rerouted = 0
    for node in range(world // ranks_per_node):
        tokens = range(node * ranks_per_node * TOKENS, (node + 1) * ranks_per_node * TOKENS)
        allowed = math.floor(fraction * top_k * len(tokens))
        for t in tokens:
            for k in range(top_k):
                if ids[t][k] // per_node != node:
                    if allowed > 0:
                        allowed -= 1
                        continue
                    options = [e for e in range(node * per_node, (node + 1) * per_node)
                               if e not in ids[t]]
                    ids[t][k] = max(options, key=lambda e: float(logits[t, e]))
                    rerouted += 1
    return torch.tensor(ids), rerouted


@pytest.mark.parametrize("world", [2, 4])
def test_gates_over_ranks_route_as_one_process_over_the_whole_batch(world):
    rules = [dict(router="swipe"),
             dict(router="topology", router_options={"outgoing_fraction": 0.14,
                                                     "ranks_per_node": world // 2})]
    ranks = run_on_ranks(_on_ranks, world, CAPACITY + rules, timeout=60)
    x = _tokens(world)
    # Capacities over every rank keep what one process keeps from the whole batch.
    for index, config in enumerate(CAPACITY):
        one = _layer(world, **{**config, "capacity_scope": "local"}).train()
        y, stats = one(x)
        assert stats.dropped > 0
        assert sum(r[index]["dropped"] for r in ranks) == stats.dropped
        torch.testing.assert_close(torch.cat([r[index]["y"] for r in ranks]), y.detach(),
                                   rtol=1e-12, atol=1e-12)
    # SWIPE and the topology gate: the naive loops' routes, weights softmax over their logits.
    logits = _layer(world, **rules[0]).router.logits(x).detach()
    swiped, moved = swipe_reference(logits, world, 2)
    capped, rerouted = topology_reference(logits, world, 2, 0.14, world // 2)
    for index, (want, changed) in enumerate(((swiped, moved), (capped, rerouted)),
                                            start=len(CAPACITY)):
        assert changed > 0
        got = torch.cat([r[index]["ids"] for r in ranks])
        assert torch.equal(got, want)
        torch.testing.assert_close(torch.cat([r[index]["weights"] for r in ranks]),
                                   logits.gather(1, want).softmax(-1))
        # The layer under expert parallelism computes those routes as one process does.
        one = _layer(world, **rules[index - len(CAPACITY)])
        one.router = FixedRoutes(one.router, want)
        torch.testing.assert_close(torch.cat([r[index]["y"] for r in ranks]), one(x)[0].detach(),
                                   rtol=1e-12, atol=1e-12)
    # SWIPE: no worker takes more than its own tokens x K.
    assert torch.bincount(swiped.flatten() // 2, minlength=world).max() <= TOKENS * 2


def test_on_one_process_and_in_evaluation_they_are_the_softmax_top_k():
    x = _tokens(1)
    for router in ("swipe", "topology"):
        layer = _layer(2, router=router)
        for training in (True, False):
            layer.train(training)
            routing = layer.router(x)
            probs = layer.router.logits(x).softmax(-1)
            top, ids = probs.topk(2)
            assert torch.equal(routing.expert_ids_TK, ids)
            torch.testing.assert_close(routing.weights_TK, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("options, message", [
    ({"outgoing_fraction": 1.5}, "outgoing_fraction=1.5 is not allowed for the 'topology' "
                                 "router: expected a number in [0, 1]"),
    ({"ranks_per_node": 0}, "ranks_per_node=0 is not allowed"),
    ({"hops": 1}, "router_options ['hops'] are not options of the 'topology' router"),
])
def test_bad_topology_options_are_refused(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoELayer(MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, router="topology",
                           router_options=options))


def test_a_capacity_scope_is_checked():
    with pytest.raises(ValueError, match="capacity_scope='global' is not allowed: one of "
                                         "local, ranks"):
        MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, capacity_scope="global")
    with pytest.raises(ValueError, match="overflow='recycle_random' is not allowed"):
        MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, capacity_factor=1.0,
                  capacity_scope="ranks", overflow="recycle_random")
