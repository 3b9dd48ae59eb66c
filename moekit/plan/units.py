"""Byte sizes of the number formats the planner counts in, and checks of planner inputs."""
from __future__ import annotations

import math

GIB = 2 ** 30

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not allowed: one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def require_positive(name: str, value, integer: bool = False) -> None:
    """A ValueError naming ``name`` unless ``value`` is a finite number > 0 (an int if asked)."""
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        kind = "a positive integer" if integer else "a finite number > 0"
        raise ValueError(f"{name}={value!r} is not allowed: expected {kind}")
