"""An exponential moving average (EMA) of the trained weights (Hunyuan-Large's DPO, against
reward hacking): after every optimizer step, ema = decay * ema + (1 - decay) * weight, for the
parameters that train (the adapters alone in a LoRA run). The policy keeps training and
sampling with its own weights; evaluation swaps the EMA in (``applied``); checkpoints hold it in
``ema.safetensors`` beside the policy's weights, and ``--resume`` restores it. On several ranks
each keeps the average of what it holds (its experts, FSDP2's shards).
"""
from __future__ import annotations

import contextlib

import torch

from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import held_part, reshard
from moekit.parallel.tensor_parallel import local

EMA_FILE = "ema.safetensors"


def check_decay(decay: float) -> None:
    if not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(f"ema decay {decay!r} is not allowed: expected a number in (0, 1), "
                         "e.g. 0.99")


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        check_decay(decay)
        self.decay, self.model = decay, model
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.parameters.items():
            self.average[name].lerp_(parameter.detach(), 1 - self.decay)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in self.average.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], mesh: Mesh = Mesh()) -> None:
        """The average from whole ``tensors`` (a checkpoint's), each rank taking its part."""
        if set(tensors) != set(self.average):
            raise ValueError(f"{EMA_FILE}: its tensors do not match the trained parameters")
        for name, tensor in tensors.items():
            local(self.average[name]).copy_(
                local(held_part(tensor, self.parameters[name], mesh)))

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The averaged weights in the model for the body (evaluation), then the policy's."""
        policy = {name: p.detach().clone() for name, p in self.parameters.items()}
        reshard(self.model)  # (each swap reaches the gathered weights of the next forward)
        for name, parameter in self.parameters.items():
            parameter.copy_(self.average[name])
        try:
            yield
        finally:
            reshard(self.model)
            for name, parameter in self.parameters.items():
                parameter.copy_(policy[name])
