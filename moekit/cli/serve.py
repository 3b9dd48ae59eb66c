"""`moekit serve`: an OpenAI-compatible HTTP server over a checkpoint folder."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

GIB = 1 << 30


def register(subcommands) -> None:
    parser = subcommands.add_parser(
        "serve", help="serve a checkpoint over HTTP (OpenAI-compatible)",
        description="Serve /v1/completions and /v1/chat/completions (streaming too) for a "
                    "checkpoint folder with its tokenizer.json; plain or quantized.")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint folder, or run folder (its newest checkpoint)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback only: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MOEKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default $MOEKIT_API_KEY)")
    parser.add_argument("--name", "--served-model-name", dest="name",
                        help="model name clients use (default: the run folder's name; the "
                        "checkpoint folder's name is accepted too)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), "
                                                         "or a torch device")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20)
    parser.add_argument("--kv-cache-gib", type=float,
                        help="largest KV cache one request may allocate, in GiB")
    parser.set_defaults(run=run)


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    try:
        from moekit.serve import load_engine, serve
    except ModuleNotFoundError as error:
        raise ValueError(f"serving needs the 'serve' extra ({error.name} is missing): "
                         "pip install 'moekit[serve]'") from None
    for flag, value in (("--port", args.port), ("--max-tokens", args.max_tokens),
                        ("--max-request-bytes", args.max_request_bytes)):
        if value < (0 if flag == "--port" else 1):
            raise ValueError(f"{flag} {value} is not allowed: expected a positive integer")
    if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
        raise ValueError(f"--kv-cache-gib {args.kv_cache_gib} is not allowed: expected > 0")
    engine = load_engine(args.checkpoint, _device(args.device), args.name,
                         max_tokens_limit=args.max_tokens,
                         kv_cache_bytes=None if args.kv_cache_gib is None
                         else int(args.kv_cache_gib * GIB))
    print(f"serving {engine.name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}")
    serve(engine, args.host, args.port, args.api_key, args.max_request_bytes)
    return 0
