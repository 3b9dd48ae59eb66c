"""``moekit CMD --nproc N``: the same command on N local processes, started by torch's elastic
agent (what ``torchrun`` runs), so that one process and torchrun behave alike."""
from __future__ import annotations


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``): what each process runs."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            kept.append(word)
    return kept


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``moekit *argv`` on ``nproc`` processes of this machine; the exit code is the first
    failed process's (0 when all succeed). Their output goes straight through."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                         "--max-restarts=0", "-m", "moekit", *argv])
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0
