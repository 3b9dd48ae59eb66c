"""Symmetric per-output-channel weight quantization: FP8 (e4m3) and int8.

Each output channel c of a weight gets one scale s_c = max |w_c| / Q, with Q the largest value
of the storage type (448 for e4m3, 127 for int8), and is stored as q = w / s (rounded to the
nearest representable value, int8 also clamped to [-127, 127]). Dequantized: w ~ q * s.
"""
from __future__ import annotations

import torch

QUANT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
LARGEST = {"fp8": torch.finfo(torch.float8_e4m3fn).max, "int8": 127.0}


def check_quant_dtype(field: str, name) -> str | None:
    """``name`` if it is a storage type moekit quantizes to (or None: leave unquantized)."""
    if name is not None and name not in QUANT_DTYPES:
        raise ValueError(f"{field}={name!r} is not allowed: expected one of "
                         f"{', '.join(QUANT_DTYPES)}, or None (keep full precision)")
    return name


def quantize_weight(weight: torch.Tensor, dtype: str, input_dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): ``weight`` in the storage type ``dtype``, and one float32 scale per output
    channel (every index except ``input_dim``; that dim has size 1 in ``scale``)."""
    check_quant_dtype("dtype", dtype)
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=input_dim, keepdim=True)
    # An all-zero channel stays zero with any scale; 1 avoids dividing by zero.
    scale = torch.where(amax > 0, amax / LARGEST[dtype], torch.ones_like(amax))
    scaled = weight / scale
    if dtype == "int8":
        scaled = scaled.round()
    return scaled.clamp(-LARGEST[dtype], LARGEST[dtype]).to(QUANT_DTYPES[dtype]), scale


# Every e4m3 value, indexed by its bit pattern.
E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(
    torch.float8_e4m3fn).float()


def convert(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q in ``dtype``, exactly. On a CPU torch converts float8 element by element; looking
    the 256 possible values up in a table is faster there (docs/inference.md, Speed)."""
    if q.dtype != torch.float8_e4m3fn or q.device.type != "cpu":
        return q.to(dtype)
    return E4M3_VALUES.to(dtype).take(q.view(torch.uint8).long())


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in ``dtype`` (the compute type of the model)."""
    return (convert(q, torch.float32) * scale).to(dtype)
