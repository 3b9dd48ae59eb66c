"""Flags that several commands share, defined once."""
from __future__ import annotations

from moekit.cli.values import byte_size, positive_float, positive_int


def expert_memory_option(parser) -> None:
    """``--expert-memory SIZE``, for every command that generates from a checkpoint."""
    parser.add_argument(
        "--expert-memory", type=byte_size, metavar="SIZE",
        help="keep the routed experts in the checkpoint file (memory-mapped) and at most SIZE "
        "bytes of the most recently used ones in memory, loaded per layer on demand (GB = 10^9 "
        "bytes, GiB = 2^30, e.g. 2GiB); attention, norms, routers and shared experts stay "
        "resident. Default: the whole model resident")


def nproc_option(group, what: str = "run") -> None:
    """``--nproc N``: the command again on N local processes, as torchrun starts them."""
    group.add_argument("--nproc", type=positive_int, metavar="N",
                       help=f"{what} on N local processes (torch's elastic agent, as torchrun)")


def collective_timeout_option(group) -> None:
    group.add_argument("--collective-timeout", type=positive_float, default=600.0,
                       metavar="S", help="seconds a rank waits for the others in a collective "
                       "before it fails (default 600)")
