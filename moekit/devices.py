"""Choosing the device: ``auto`` is CUDA, then Apple's MPS, then the CPU."""
from __future__ import annotations

import os

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


def retain_freed_cpu_memory(training: bool = False) -> bool:
    """Let glibc's malloc reuse freed memory for large CPU tensors instead of mapping fresh pages.

    An MoE layer's step allocates and frees hundreds of MB (permuted activations, each expert's
    weight gradient). glibc serves every block above 32 MiB with a fresh mmap, whose pages then
    fault in one by one on first touch: at E = 64 that made the expert matmuls of a
    forward+backward take 1.62x the dense floor's instead of 1.30x (benchmarks/moe_layer.py,
    docs/moe.md#speed). Raising the mmap and trim thresholds keeps freed blocks in the process
    for the next step. Process-wide, so the command-line entry point calls it, not the layer;
    returns False (and changes nothing) where the C library is not glibc.

    ``training``: never give freed memory back to the system. ``zero_grad`` frees every gradient
    at once (1.65 GB for a 414M-parameter model), more than any fixed threshold that suits
    inference, and the next backward then faults all of it in again, page by page, every step
    (docs/train.md, Speed). A training process reaches its peak again at every step, so what
    it frees it will use again.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        set_option = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    never = -1  # mallopt(3): a trim threshold of -1 disables trimming
    return bool(set_option(m_mmap_threshold, 1 << 30)
                and set_option(m_trim_threshold, never if training else 1 << 30))


def anonymous_resident_bytes() -> int | None:
    """This process's anonymous resident memory (RssAnon of /proc/self/status: what it holds
    itself, not the file pages it maps, which the OS may drop); None where /proc is absent."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status
                        if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None


def free_memory_bytes(device: torch.device) -> int:
    """Memory the device has free now: CUDA's own count, else the host's MemAvailable (what
    Linux can hand out without swapping; the whole of physical memory where /proc is absent)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
