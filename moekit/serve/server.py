"""Loading a checkpoint for serving, and running the server with uvicorn."""
from __future__ import annotations

import os
from pathlib import Path

from moekit.files import CheckpointError
from moekit.quant import load_for_inference
from moekit.serve.app import create_app
from moekit.serve.engine import Engine
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
                **limits) -> Engine:
    """An engine over a checkpoint folder (plain or quantized), or a run folder's newest, with
    its ``tokenizer.json`` (and chat template, where ``tokenizer_config.json`` has one), served
    under ``served_names``; ``limits``: Engine's."""
    checkpoint = resolve_checkpoint(path)
    model = load_for_inference(checkpoint, device)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {model.config.vocab_size}")
    served, *aliases = served_names(Path(path), checkpoint, name)
    return Engine(model, tokenizer, served, aliases=tuple(aliases),
                  chat_template=read_chat_template(checkpoint), **limits)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_request_bytes: int = 1 << 20) -> None:
    """Serve until interrupted (loopback only unless ``host`` says otherwise)."""
    import uvicorn
    uvicorn.run(create_app(engine, api_key, max_request_bytes), host=host, port=port)
