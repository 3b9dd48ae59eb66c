"""Loading a checkpoint for serving, and running the server with uvicorn."""
from __future__ import annotations

import os
import signal
from functools import partial
from pathlib import Path

import torch
import uvicorn

from moekit.files import CheckpointError
from moekit.parallel import load_for_serving
from moekit.quant import load_for_inference
from moekit.serve.app import create_app
from moekit.serve.engine import Engine
from moekit.serve.split import LeaderRunner, follow, split_across_processes
from moekit.train.chat import read_chat_template
from moekit.train.checkpoint import CHECKPOINTS, resolve_checkpoint
from moekit.train.tokenizer import load_tokenizer


def served_names(path: Path, checkpoint: Path, name: str | None) -> tuple[str, ...]:
    """The names a client may ask for, the served one first: ``name``, else the run's name (the
    run folder's, which stays when a newer checkpoint is served), else the folder's; the
    checkpoint's own folder name (``step-000100``) is accepted too."""
    if (path / CHECKPOINTS).is_dir():
        run = path
    elif checkpoint.parent.name == CHECKPOINTS:
        run = checkpoint.parent.parent
    else:
        run = checkpoint
    served = name or run.resolve().name
    return (served,) if served == checkpoint.name else (served, checkpoint.name)


def load_engine(path: str | os.PathLike, device: str = "cpu", name: str | None = None,
                expert_memory: int | None = None, split_timeout: float | None = None,
                **limits) -> Engine:
    """An engine over a checkpoint folder (plain or quantized), or a run folder's newest, with
    its ``tokenizer.json`` (and chat template, where ``tokenizer_config.json`` has one), served
    under ``served_names``; its experts offloaded into a cache of ``expert_memory`` bytes when
    that is given (``moekit.parallel.offload``), or split over the processes of the default
    group when ``split_timeout`` (their collective timeout) is given: this is rank 0, the
    others ``follow_checkpoint`` (``moekit.serve.split``); ``limits``: Engine's."""
    checkpoint = resolve_checkpoint(path)
    model = load_for_serving(checkpoint, device, expert_memory)
    if split_timeout is not None:
        model = split_across_processes(model, device)
        limits["runner"] = partial(LeaderRunner, collective_timeout=split_timeout)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {model.config.vocab_size}")
    served, *aliases = served_names(Path(path), checkpoint, name)
    return Engine(model, tokenizer, served, aliases=tuple(aliases),
                  chat_template=read_chat_template(checkpoint), **limits)


def serving_threads(device: str) -> int | None:
    """torch's threads for a server's forwards: on a CPU all of torch's but one, which is left
    to the HTTP front end (the event loop writing every stream's events), as vLLM's CPU
    set-up does; at least one. When the forwards' OpenMP threads and the front end contend
    for the same cores, every parallel region waits for the thread that lost its core: at 16
    streaming clients on 2 cores, one thread made 1.4-1.7x the tokens/s of two
    (``benchmarks/serve_phases.py``; docs/inference.md, Serving). None (torch's own) on an
    accelerator, or where ``$OMP_NUM_THREADS`` says."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, torch.get_num_threads() - 1)


def follow_checkpoint(path: str | os.PathLike, device: str = "cpu") -> None:
    """A follower rank of a split server: its part of the checkpoint, running rank 0's calls
    until rank 0 stops."""
    model = load_for_inference(resolve_checkpoint(path), device)
    follow(split_across_processes(model, device))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a signal first closes the engine's door (new requests get 503),
    and the process then exits normally: uvicorn re-raises the signal once it has shut down,
    which would end the process with the signal's status instead of 0."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def on_tick(self, counter: int) -> bool:
        if self.engine.scheduler.failure is not None:
            self.should_exit = True  # the split model's processes lost each other
        return await super().on_tick(counter)

    def handle_exit(self, sig, frame) -> None:
        self.engine.scheduler.stop_admitting()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting, as uvicorn does
        self.should_exit = True


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_request_bytes: int = 1 << 20,
          max_streams_per_client: int = 16, shutdown_timeout: float = 30.0,
          loop: str = "auto", http: str = "auto") -> None:
    """Serve until SIGTERM or Ctrl-C (loopback only unless ``host`` says otherwise), then
    stop admitting requests, let the running ones finish for up to ``shutdown_timeout``
    seconds (uvicorn then cancels what is left), and return. ``loop`` and ``http``: uvicorn's
    settings of those names; "auto" takes uvloop and httptools (the serve extra installs
    both), whose C code leaves more of the process's one GIL to the scheduler's forwards than
    asyncio's and h11's Python ("asyncio", "h11": ``benchmarks/serve_phases.py
    --pure-python-http`` measures the difference)."""
    app = create_app(engine, api_key, max_request_bytes, max_streams_per_client)
    config = uvicorn.Config(app, host=host, port=port, loop=loop, http=http,
                            timeout_graceful_shutdown=shutdown_timeout)
    try:
        DrainingServer(config, engine).run()
    finally:
        engine.close()
