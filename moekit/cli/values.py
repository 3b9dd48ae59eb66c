"""argparse types that refuse a bad value in one line naming it and what is allowed."""
from __future__ import annotations

import argparse
import re


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: expected an integer >= 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: expected a number > 0")
    return value


# Size units as transformers' max_shard_size reads them: GB = 10^9 bytes, GiB = 2^30.
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def byte_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes (units in any case)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    factors = {unit.upper(): factor for unit, factor in SIZE_UNITS.items()}
    factor = factors.get((match.group(2) or "B").upper()) if match else None
    if factor is None or float(match.group(1)) * factor < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: expected a positive number with a unit of "
            f"{', '.join(SIZE_UNITS)} (e.g. 5GB)")
    return int(float(match.group(1)) * factor)
