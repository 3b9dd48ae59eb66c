#!/usr/bin/env python3
"""Bytes each rank holds of parameters, gradients and AdamW state at every ZeRO level, counted
from the tensors themselves, beside what ``moekit.plan.training_memory`` predicts.

    python benchmarks/zero_memory.py              # tiny preset, 4 gloo processes, float32
    python benchmarks/zero_memory.py --module-experts   # its experts as ModuleExperts

Each layout trains one step of the tiny preset (batch 8 x 64) on 4 forked gloo processes;
then each rank sums the bytes of what it holds: parameters at rest (FSDP2's shards under
ZeRO-3), gradients as the optimizer receives them (counted inside the step), and the
optimizer's state (a ZeRO-1 part's partition, FSDP2's shards). The largest rank is shown.
What this leaves out: activations, DDP's and FSDP2's communication buffers, and ZeRO-3's
parameters while a block's forward or backward has gathered them whole (transient).
The planner counts 4 bytes per weight and per gradient and 8 per parameter of state (two
fp32 moments, no master copy: this run trains in float32). With ``--module-experts`` every
MoE layer's experts are ``ModuleExperts`` of SwiGLU MLPs of the same shapes (any module as an
expert), in the layouts without EDP.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from moekit.config import TrainConfig, preset
from moekit.model import Transformer
from moekit.moe import MLP, ModuleExperts, MoELayer
from moekit.parallel.mesh import world_mesh
from moekit.parallel.parallelize import parallelize
from moekit.parallel.processes import run_on_ranks
from moekit.plan import Layout
from moekit.plan.training import Precision, training_memory
from moekit.train.checkpoint import held_optimizer_state
from moekit.train.optim import build_optimizer
from moekit.train.step import train_step

# (expert degree, ZeRO level, tensor degree: EDP when > 1)
LAYOUTS = ([(1, zero, 1) for zero in (0, 1, 2, 3)] + [(2, zero, 1) for zero in (0, 1, 2, 3)]
           + [(4, zero, 1) for zero in (0, 1, 3)] + [(2, zero, 2) for zero in (0, 1, 2, 3)])
TRAIN = TrainConfig(batch_size=8, seq_len=64, lb_scope="step")


def _bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _as_module_experts(model: Transformer) -> Transformer:
    """``model`` with each MoE layer's experts a ``ModuleExperts`` of MLPs of their shapes."""
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            experts = layer.experts
            layer.experts = ModuleExperts([MLP(experts.hidden_size, experts.ffn_size,
                                               experts.activation)
                                           for _ in range(experts.num_experts)])
    return model


def _held(rank, world, layouts, module_experts):
    held = []
    for expert, zero, tensor in layouts:
        mesh = replace(world_mesh(expert=expert, tensor=tensor), zero=zero)
        torch.manual_seed(0)
        model = Transformer(preset("tiny")).train()
        if module_experts:
            _as_module_experts(model)
        parallel_model = parallelize(model, mesh)
        optimizer = build_optimizer(model, TRAIN, mesh)
        counted = {}
        step = optimizer.step

        def counting_step(closure=None):
            counted["gradients"] = _bytes(p.grad for p in model.parameters() if p.grad is not None)
            step()

        optimizer.step = counting_step
        tokens = torch.randint(0, model.config.vocab_size, (8, 65),
                               generator=torch.Generator().manual_seed(1))
        train_step(parallel_model, optimizer, tokens[:, :-1], tokens[:, 1:], TRAIN, mesh)
        state = [v for s in held_optimizer_state(optimizer).values() for v in s.values()
                 if v.dim() > 0]
        held.append({"weights": _bytes(model.parameters()), **counted,
                     "optimizer_states": _bytes(state)})
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--module-experts", action="store_true",
                        help="the experts as ModuleExperts of MLPs (layouts without EDP)")
    args = parser.parse_args()
    layouts = [layout for layout in LAYOUTS if not (args.module_experts and layout[2] > 1)]
    ranks = run_on_ranks(_held, args.processes, layouts, args.module_experts, timeout=600)
    config = preset("tiny")
    mib = 2 ** 20
    print(f"tiny preset{' with ModuleExperts' if args.module_experts else ''}, "
          f"{args.processes} gloo processes, float32; MiB per rank (largest rank), "
          "measured / planned")
    print(f"{'layout':<22}{'weights':>16}{'gradients':>16}{'optimizer':>16}{'total':>16}")
    for index, (expert, zero, tensor) in enumerate(layouts):
        measured = {key: max(rank[index][key] for rank in ranks) for key in ranks[0][index]}
        layout = Layout(data=args.processes // tensor, tensor=tensor, expert=expert)
        plan = training_memory(config, layout, Precision(4, 4, 8, "fp32", zero), 1,
                               TRAIN.seq_len).stages[0]
        planned = {key: getattr(plan, key) for key in measured}
        cells = [f"{measured[k] / mib:6.2f} / {planned[k] / mib:6.2f}" for k in measured]
        total = f"{sum(measured.values()) / mib:6.2f} / {sum(planned.values()) / mib:6.2f}"
        name = (f"DP {args.processes}" if expert == 1 else
                f"DP {args.processes // tensor} x EDP {tensor}" if tensor > 1 else
                f"EP {expert}" if expert == args.processes else
                f"DP {args.processes // expert} x EP {expert}")
        row = "".join(f"{cell:>16}" for cell in [*cells, total])
        print(f"{name + f', ZeRO-{zero}':<22}{row}")


if __name__ == "__main__":
    main()
