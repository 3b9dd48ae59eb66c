"""AdamW parameter groups with expert-specific learning rates, and the learning-rate schedule.

Groups, by the role of a parameter (Hunyuan-Large gives experts their own learning rates):
  router          the gate of each MoE layer                          scale 1
  shared_experts  always-on experts (and their sigmoid gate): see every token   scale 1
  routed_experts  each sees about top_k / num_experts of the tokens   scale sqrt(top_k / E)
  other           attention, embeddings, norms, dense FFNs            scale 1
Why sqrt: Adam's best learning rate grows roughly with the square root of the batch size, and a
routed expert's effective batch is top_k / num_experts of the step's tokens. With
``expert_lr_rule="same"`` every scale is 1. (Skywork-MoE reports that this scaling stopped helping
once the learning rate had decayed: it is a default, not a law.) Matrices get weight decay;
vectors (norms, biases) do not.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from moekit.config import TrainConfig
from moekit.moe import MoELayer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import gradient_norm
from moekit.parallel.tensor_parallel import is_sharded, local


def _roles(model: nn.Module, rule: str) -> dict[int, tuple[str, float]]:
    """id(parameter) -> (role, learning-rate scale) for the parameters of MoE layers."""
    roles = {}
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        config = layer.config
        routed_scale = (math.sqrt(config.top_k / config.num_experts)
                        if rule == "sqrt_tokens" else 1.0)
        parts = [(layer.router, "router", 1.0), (layer.experts, "routed_experts", routed_scale),
                 (layer.shared_experts, "shared_experts", 1.0),
                 (layer.shared_gate, "shared_experts", 1.0)]
        for part, role, scale in parts:
            for parameter in (part.parameters() if part is not None else ()):
                roles[id(parameter)] = (role, scale)
    return roles


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups; each carries its ``role`` and ``lr_scale`` (used by ``set_learning_rate``)."""
    roles = _roles(model, config.expert_lr_rule)
    groups: dict[tuple, dict] = {}
    for parameter in model.parameters():  # each tied parameter once
        if not parameter.requires_grad:
            continue
        role, scale = roles.get(id(parameter), ("other", 1.0))
        decay = config.weight_decay if parameter.dim() >= 2 else 0.0
        # AdamW's kernels take a group's tensors together: tensor-parallel (DTensor) ones and
        # plain ones go in groups of their own.
        group = groups.setdefault((role, scale, decay, is_sharded(parameter)), {
            "params": [], "role": role, "lr_scale": scale, "weight_decay": decay})
        group["params"].append(parameter)
    return list(groups.values())


class SplitOptimizer:
    """One optimizer made of parts, each stepping some of the parameter groups with its own
    sharding of the state (ZeRO-1 under expert parallelism: the replicated parameters' moments
    sharded over every rank, each expert's over the ranks that hold that expert).
    ``param_groups`` lists the groups in ``parameter_groups``' order whatever the parts, so a
    checkpoint names them alike at every layout; setting a group's ``lr`` sets its part's."""

    def __init__(self, parts: list[torch.optim.Optimizer], positions: list[list[int]]):
        self.parts, self.positions = parts, positions
        self.defaults = parts[0].defaults

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: loading a state dict gives a part new group dicts.
        placed = {position: group for part, where in zip(self.parts, self.positions)
                  for position, group in zip(where, part.param_groups)}
        return [placed[position] for position in sorted(placed)]

    def step(self, closure=None) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def optimizer_parts(optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that hold ``optimizer``'s state: its parts, or itself."""
    return list(getattr(optimizer, "parts", [optimizer]))


def local_updaters(optimizer) -> list[torch.optim.Optimizer]:
    """The AdamW instances that update this rank's parameters: each part's, a
    ``ZeroRedundancyOptimizer``'s local one (its ``optim``, over this rank's partition)."""
    return [getattr(part, "optim", part) for part in optimizer_parts(optimizer)]


def _moments_sharded_over(parameters: list[nn.Parameter], mesh: Mesh):
    """The ranks over which ZeRO shards the AdamW moments of a group's ``parameters`` (None:
    kept whole on this rank)."""
    if any(is_sharded(p) for p in parameters):
        # Tensor-parallel (DTensor) weights: already 1/T per rank, and ZeroRedundancyOptimizer
        # broadcasts plain tensors only.
        return None
    if mesh.expert_size > 1 and all(getattr(p, "expert_parallel", False) for p in parameters):
        # Experts FSDP2 leaves whole under ZeRO-2/3 (ModuleExperts) have theirs sharded as
        # under ZeRO-1.
        return mesh.expert_replica_group if mesh.zero >= 1 and mesh.expert_replicas > 1 else None
    # Under ZeRO-2/3 the parameters are shards already.
    return mesh.data_group if mesh.zero == 1 and mesh.data_size > 1 else None


def build_optimizer(model: nn.Module, config: TrainConfig, mesh: Mesh = Mesh()):
    """AdamW over ``parameter_groups``, implemented as ``config.optimizer_impl`` says
    (``implementation_of`` tells what "auto" chose).

    Fused is the default because at many experts the loop's temporaries cost half a step
    (docs/train.md, Speed). The three keep the same state under the same names, so a
    checkpoint written with one resumes with another. With ``mesh.zero == 1`` on several ranks
    the state is sharded (ZeRO-1, as Skywork-MoE trained: ``ZeroRedundancyOptimizer``, each
    rank updating its share and broadcasting it): over every rank of the stage (of the ``dp``
    group under EDP), and under expert parallelism the experts' over the ranks holding the
    same experts (kept whole where each expert has one replica), in a ``SplitOptimizer``;
    EDP's tensor-parallel weights keep their moments whole (1/T of the model's already).
    Under ZeRO-2/3 the parameters are already shards (``DTensor``; the experts over their
    replicas), and so are the moments AdamW makes of them; experts FSDP2 leaves whole
    (``ModuleExperts``) have their moments sharded as under ZeRO-1."""
    groups = parameter_groups(model, config)
    options = dict(lr=config.lr, betas=(config.beta1, config.beta2))
    parts: dict = {}  # the process group a group's moments are sharded over -> its positions
    for position, group in enumerate(groups):
        parts.setdefault(_moments_sharded_over(group["params"], mesh), []).append(position)
    parts = [(positions, shard_over) for shard_over, positions in parts.items()]

    def adamw(positions: list[int], shard_over, **kind):
        chosen = [groups[i] for i in positions]
        if shard_over is None:
            return torch.optim.AdamW(chosen, **kind, **options)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(chosen, optimizer_class=torch.optim.AdamW,
                                       process_group=shard_over, **kind, **options)

    def build(**kind):
        built = [adamw(positions, shard_over, **kind) for positions, shard_over in parts]
        return built[0] if len(built) == 1 else SplitOptimizer(built, [p for p, _ in parts])

    impl = config.optimizer_impl
    if impl in ("auto", "fused"):
        try:
            return build(fused=True)
        except RuntimeError as error:  # torch has no fused kernel for this device or dtype
            if impl == "fused":
                raise ValueError(f"optimizer_impl='fused' is not available here ({error}); "
                                 "use foreach or loop") from None
            impl = "foreach"
    return build(foreach=impl == "foreach")


def clipped_step(optimizer, model: nn.Module, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """Clip the gradients to a global norm of ``max_norm`` (as ``clip_grad_norm_``; ``inf``: no
    clipping), step ``optimizer`` and zero the gradients; returns the norm before clipping.

    The clip factor is one number for every gradient. Fused AdamW divides the gradients by its
    ``grad_scale`` (the hook ``GradScaler`` uses) inside its own pass over them, so it gets
    the factor there instead of a separate pass that reads and writes every gradient (at 64
    experts that pass was a tenth of the step, docs/train.md). The loop and foreach kernels take
    no such factor and get the gradients scaled first."""
    norm = gradient_norm(model, mesh)
    # Read on the host: the step logs the norm anyway, and under the limit nothing is scaled.
    if math.isfinite(max_norm) and float(norm) + 1e-6 > max_norm:
        updaters = local_updaters(optimizer)
        if all(updater.defaults.get("fused") for updater in updaters):
            divisor = ((norm + 1e-6) / max_norm).float()
            for updater in updaters:
                updater.grad_scale = divisor
            try:
                optimizer.step()
            finally:
                for updater in updaters:
                    del updater.grad_scale
        else:
            gradients = [local(p.grad) for p in model.parameters() if p.grad is not None]
            torch._foreach_mul_(gradients, (max_norm / (norm + 1e-6)).to(gradients[0].dtype))
            optimizer.step()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def implementation_of(optimizer: torch.optim.Optimizer) -> str:
    """fused, foreach or loop: how ``optimizer`` steps."""
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "loop"


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps`` (step 0 already trains), then a cosine down
    to ``lr * min_lr_ratio`` at the last step of the schedule (``schedule_steps``, default
    ``steps``), and ``lr * min_lr_ratio`` after it."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max((config.schedule_steps or config.steps) - 1 - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    rate = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = rate * group["lr_scale"]
    return rate


def extend_schedule(config: TrainConfig, steps: int) -> TrainConfig:
    """The config of a run extended to ``steps`` (``--resume --steps``): the cosine keeps its
    end, and the added steps train at its floor, ``lr * min_lr_ratio`` (a constant tail).
    Why not stretch the cosine to the new end: the learning rate would jump back up at the
    resumed step, and the steps already taken would no longer follow the run's own schedule;
    with a constant tail, the extended run is the original run followed by steps at the rate it
    ended on, and extending it twice is the same as extending it once."""
    if steps < config.steps:
        raise ValueError(f"--steps {steps} is not allowed with --resume: the run is set to "
                         f"{config.steps} steps, and --steps can only extend it (>= "
                         f"{config.steps})")
    if steps == config.steps:
        return config
    return replace(config, steps=steps, schedule_steps=config.schedule_steps or config.steps)
