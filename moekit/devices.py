"""Choosing the device: ``auto`` is CUDA, then Apple's MPS, then the CPU."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise ValueError(f"device={name!r} is not allowed: one of {', '.join(DEVICE_CHOICES)} "
                         "(cuda may name an index, e.g. cuda:1)")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}[base]
    if not available:
        raise ValueError(f"device={name!r} is not available on this machine")
    return torch.device(name)
