"""Loading a checkpoint for serving, and running the server with uvicorn."""
from __future__ import annotations

import os
from pathlib import Path

from moekit.files import CheckpointError
from moekit.quant import load_for_inference
from moekit.serve.app import create_app
from moekit.serve.engine import Engine
from moekit.serve.text import read_chat_template
from moekit.train.tokenizer import load_tokenizer


def load_engine(checkpoint: str | os.PathLike, device: str = "cpu", name: str | None = None,
                **limits) -> Engine:
    """An engine over a checkpoint folder (plain or quantized) with its ``tokenizer.json``
    (and chat template, where ``tokenizer_config.json`` has one); ``limits``: Engine's."""
    model = load_for_inference(checkpoint, device)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {model.config.vocab_size}")
    return Engine(model, tokenizer, name or Path(checkpoint).resolve().name,
                  chat_template=read_chat_template(checkpoint), **limits)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_request_bytes: int = 1 << 20) -> None:
    """Serve until interrupted (loopback only unless ``host`` says otherwise)."""
    import uvicorn
    uvicorn.run(create_app(engine, api_key, max_request_bytes), host=host, port=port)
