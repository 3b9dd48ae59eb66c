"""Accelerators the planner knows: dense BF16 peak FLOP/s and memory.

Peaks are the vendors' dense figures (without 2:4 sparsity), the denominator of MFU. Sources:
NVIDIA A100 datasheet (312 TFLOPS BF16, 80 GB; the A800 is the export A100 with the same
compute); NVIDIA H100 datasheet, SXM (989 TFLOPS BF16, 80 GB; the H800 is the export H100 with
the same compute); NVIDIA H200 datasheet (989 TFLOPS BF16, 141 GB); NVIDIA Ada Lovelace
architecture whitepaper, appendix (RTX 4090: 165.2 TFLOPS BF16 with FP32 accumulate, 24 GB);
NVIDIA L40S datasheet (362 TFLOPS BF16, 48 GB); AMD Instinct MI300X datasheet (1307.4 TFLOPS
BF16, 192 GB). Memory is taken in GiB, as decisions.md asks ("24 GB" means 24 GiB).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense BF16
    memory_gib: float


DEVICES = {device.name: device for device in (
    Device("a100", 312.0, 80),
    Device("a800", 312.0, 80),
    Device("h100", 989.0, 80),
    Device("h800", 989.0, 80),
    Device("h200", 989.0, 141),
    Device("rtx4090", 165.2, 24),
    Device("l40s", 362.0, 48),
    Device("mi300x", 1307.4, 192),
)}


def device(name: str) -> Device:
    """The device called ``name`` (case, spaces and dashes ignored: "RTX 4090" = "rtx4090")."""
    key = name.lower().replace(" ", "").replace("-", "") if isinstance(name, str) else name
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)} "
                         "(or give the peak with --peak-tflops and the memory with "
                         "--device-memory-gib)")
    return DEVICES[key]
