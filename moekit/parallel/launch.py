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


def launch(nproc: int, argv: list[str], stop_is_success: bool = False) -> int:
    """Run ``moekit *argv`` on ``nproc`` processes of this machine; the exit code is the first
    failed process's (0 when all succeed). Their output goes straight through. On SIGTERM or
    SIGINT the agent passes the signal to the processes and waits for them; the exit code is
    then 0 for a command whose way to stop that is (``stop_is_success``: a server, which drains
    its requests), else 128 + the signal's number, as a shell reports it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}",
                                         "--max-restarts=0", "-m", "moekit", *argv])
    try:
        run(args)
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), 1)
    except SignalException as stop:
        return 0 if stop_is_success else 128 + int(stop.sigval)
    return 0
