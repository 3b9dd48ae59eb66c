"""The equivalence matrix's building blocks: one training step's loss, statistics and gradients
under a layout, and their comparison with the single-process step (docs/correctness.md).

``step_outcome`` builds the model from a seed (the same weights on every rank and layout), runs
``train_step`` on a given global batch, and returns what the step computed: the logged figures
and every parameter's gradient as the optimizer received it (after the data-parallel reduction
and clipping). ``compare`` gives one ``Check`` per figure: the largest difference relative to
the reference's magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.config import ModelConfig, TrainConfig
from moekit.model import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import parallelize
from moekit.train.step import train_step


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer that only keeps a copy of each gradient it is asked to apply."""

    def __init__(self, named_parameters):
        named = list(named_parameters)
        super().__init__([p for _, p in named], {})
        self.names = {id(p): name for name, p in named}
        self.gradients: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self.gradients[self.names[id(parameter)]] = parameter.grad.detach().clone()


@dataclass
class StepOutcome:
    figures: dict[str, torch.Tensor]  # loss, router_loss, grad_norm, drop_rate, expert_load
    gradients: dict[str, torch.Tensor]


def step_outcome(model_config: ModelConfig, train_config: TrainConfig, inputs: torch.Tensor,
                 targets: torch.Tensor, mask: torch.Tensor | None = None, mesh: Mesh = Mesh(),
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> StepOutcome:
    torch.manual_seed(seed)
    model = Transformer(model_config).to(dtype).train()
    recorder = GradientRecorder(model.named_parameters())
    record = train_step(parallelize(model, mesh), recorder, inputs, targets, train_config, mesh,
                        mask)
    figures = {key: torch.tensor(record[key], dtype=torch.float64)
               for key in ("loss", "router_loss", "grad_norm", "drop_rate", "expert_load")}
    return StepOutcome(figures=figures, gradients=recorder.gradients)


@dataclass
class Check:
    name: str
    difference: float  # max |got - want| / max(max |want|, floor)
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance


def relative_difference(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    """Largest elementwise difference relative to the reference tensor's largest magnitude
    (normwise, so that entries near zero are judged at the tensor's scale), at least ``floor``
    in the denominator (a tensor that is zero everywhere is compared absolutely)."""
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    scale = max(float(want.abs().max()), floor)
    return float((got.double() - want.double()).abs().max()) / scale


def compare(got: StepOutcome, want: StepOutcome, tolerance: float,
            floor: float = 1e-12) -> list[Check]:
    """One check per figure and one for all gradients together (the worst tensor)."""
    checks = [Check(name, relative_difference(got.figures[name], value, floor), tolerance)
              for name, value in want.figures.items()]
    missing = set(want.gradients) ^ set(got.gradients)
    worst = float("inf") if missing else max(
        relative_difference(got.gradients[name], value, floor)
        for name, value in want.gradients.items())
    return checks + [Check("gradients", worst, tolerance)]
