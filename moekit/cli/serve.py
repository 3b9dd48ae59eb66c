"""`moekit serve`: an OpenAI-compatible HTTP server over a checkpoint folder."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from moekit.cli.paths import input_option, output_option
from moekit.cli.options import collective_timeout_option, expert_memory_option, nproc_option
from moekit.cli.values import byte_size, positive_float, positive_int
from moekit.parallel.launch import launch, without_nproc
from moekit.parallel.mesh import (CollectiveError, launched_by_torchrun, mesh_from_environment,
                                  torchrun_world_size)

GIB = 1 << 30


def register(subcommands) -> None:
    parser = subcommands.add_parser(
        "serve", help="serve a checkpoint over HTTP (OpenAI-compatible)",
        description="Serve /v1/completions and /v1/chat/completions (streaming too) for a "
                    "checkpoint folder with its tokenizer.json; plain or quantized.")
    input_option(parser, "--checkpoint", required=True, type=Path,
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
                        help="largest KV cache one request may take, in GiB (2^30 bytes)")
    batching = parser.add_argument_group(
        "continuous batching", "One thread owns the model; requests join the running batch "
        "at the next decoding step and leave it when done. KV memory is one pool of blocks.")
    batching.add_argument("--kv-cache-memory", type=byte_size, metavar="SIZE",
                          help="KV cache for all requests together: a size with its unit, "
                          "GB = 10^9 bytes, GiB = 2^30 (e.g. 2GiB, 500MB); default: 90%% of "
                          "the free memory once the weights are loaded, at most what "
                          "--max-batch-size sequences of the full context need")
    batching.add_argument("--kv-block-size", type=positive_int, default=16, metavar="N",
                          help="positions per KV cache block (default 16)")
    batching.add_argument("--max-batch-size", type=positive_int, default=32, metavar="N",
                          help="most sequences decoding together (default 32)")
    batching.add_argument("--max-waiting", type=positive_int, default=64, metavar="N",
                          help="most requests waiting for memory or a batch row; past it a "
                          "request gets 429 with Retry-After (default 64)")
    batching.add_argument("--prefill-tokens-per-step", type=positive_int, default=64,
                          metavar="N", help="new requests' prompt tokens that join one "
                          "decoding step (their prefill rides in the step's forward, which "
                          "reads the experts once for both); a longer prompt goes in chunks "
                          "over several steps (default 64)")
    batching.add_argument("--separate-prefill", action="store_true",
                          help="prefill each request in a forward of its own instead, one "
                          "request between two decoding steps (the engine before chunked "
                          "prefill; to compare)")
    batching.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                          help="compile the decoding step with torch.compile (inductor) "
                          "before serving, with the batch size, the block tables' width and "
                          "the prompt chunk's length dynamic: three graphs (batches of 1, 2, "
                          "and 3 or more rows) serve every decoding step, three more the "
                          "steps with a one-row prompt chunk (others run eagerly); the "
                          "compilation, timed on stderr, takes a minute or more on a 2-core "
                          "CPU (less from inductor's on-disk cache), paid once per start. Not "
                          "with --split, --expert-memory or quantized experts "
                          "(docs/inference.md, Serving; default off)")
    batching.add_argument("--threads", type=positive_int, metavar="N",
                          help="torch threads for the forwards; default on a CPU: all of "
                          "torch's but one, left to the HTTP front end that writes every "
                          "stream's events (as vLLM's CPU server does; $OMP_NUM_THREADS, when "
                          "set, is kept as it is); on a GPU torch's own")
    safety = parser.add_argument_group("safety")
    safety.add_argument("--request-timeout", type=positive_float, default=600.0, metavar="S",
                        help="deadline of a request, from arrival to its last token, in "
                        "seconds (default 600); past it the request ends with 504")
    safety.add_argument("--max-streams-per-client", type=positive_int, default=16,
                        metavar="N", help="most requests one client address may have in "
                        "flight, streaming or not (default 16); the next gets 429")
    safety.add_argument("--shutdown-timeout", type=positive_float, default=30.0, metavar="S",
                        help="on SIGTERM or Ctrl-C: stop admitting, let running requests "
                        "finish for up to S seconds, cancel the rest, exit 0 (default 30)")
    expert_memory_option(parser)
    processes = parser.add_argument_group(
        "several processes (docs/inference.md)",
        "torchrun --nproc-per-node N -m moekit serve --split auto ... (or --nproc N here) "
        "serves one model split over N processes: rank 0 answers HTTP and schedules, the "
        "others run its steps with it. gloo on CPU, NCCL with one process per GPU.")
    processes.add_argument("--split", choices=("auto",),
                           help="auto: Skywork-MoE's non-uniform split, experts and key/value "
                           "heads in proportion to each process's free device memory")
    nproc_option(processes, "serve")
    collective_timeout_option(processes)
    output_option(parser, "--log-routing", kind="file",
                  help="write one JSON line per finished request with its routed tokens per "
                  "MoE layer and expert (live totals are at /metrics)")
    parser.set_defaults(run=run)


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _serving():
    """``moekit.serve``, which needs the serve extra."""
    try:
        import moekit.serve
    except ModuleNotFoundError as error:
        raise ValueError(f"serving needs the 'serve' extra ({error.name} is missing): "
                         "pip install 'moekit[serve]'") from None
    return moekit.serve


def run(args: argparse.Namespace) -> int:
    serving = _serving()
    for flag, value in (("--port", args.port), ("--max-tokens", args.max_tokens),
                        ("--max-request-bytes", args.max_request_bytes)):
        if value < (0 if flag == "--port" else 1):
            raise ValueError(f"{flag} {value} is not allowed: expected a positive integer")
    if args.kv_cache_gib is not None and args.kv_cache_gib <= 0:
        raise ValueError(f"--kv-cache-gib {args.kv_cache_gib} is not allowed: expected > 0")
    if args.compile and (args.split is not None or args.expert_memory is not None):
        other = "--split" if args.split is not None else "--expert-memory"
        raise ValueError(f"--compile does not go with {other}: the compiled step needs the "
                         "whole model resident in one process")
    if args.split is not None and args.expert_memory is not None:
        raise ValueError("--split and --expert-memory do not go together: a split model holds "
                         "its experts in memory, spread over the processes")
    if args.nproc is not None:
        if launched_by_torchrun():
            raise ValueError("--nproc starts the processes itself: under torchrun, drop it "
                             "(torchrun's --nproc-per-node sets them)")
        if args.split is None:
            raise ValueError(f"--nproc {args.nproc} serves one model over {args.nproc} "
                             "processes: add --split auto")
        return launch(args.nproc, without_nproc(args.argv), stop_is_success=True)
    world = torchrun_world_size()
    if world > 1 and args.split is None:
        raise ValueError(f"{world} processes (torchrun) serve one model split over them: add "
                         "--split auto")
    device = _device(args.device)
    if world == 1:  # --split over one process: the whole model
        return _serve(args, device, split_timeout=None)
    mesh = mesh_from_environment(torch.device(device), args.collective_timeout)
    try:
        if not mesh.is_main:
            serving.follow_checkpoint(args.checkpoint, device)
            return 0
        return _serve(args, device, split_timeout=args.collective_timeout)
    except CollectiveError as error:
        print(f"moekit serve: {error}", file=sys.stderr)
        return 1
    finally:
        mesh.close()


def _serve(args: argparse.Namespace, device: str, split_timeout: float | None) -> int:
    from moekit.parallel import expert_cache
    serving = _serving()
    engine = serving.load_engine(
        args.checkpoint, device, args.name, expert_memory=args.expert_memory,
        split_timeout=split_timeout, max_tokens_limit=args.max_tokens,
        kv_cache_bytes=None if args.kv_cache_gib is None else int(args.kv_cache_gib * GIB),
        kv_cache_memory=args.kv_cache_memory, block_size=args.kv_block_size,
        max_batch=args.max_batch_size, max_waiting=args.max_waiting,
        request_timeout=args.request_timeout, routing_log=args.log_routing,
        compile=args.compile, prefill_tokens_per_step=args.prefill_tokens_per_step,
        separate_prefill=args.separate_prefill,
        threads=serving.serving_threads(device) if args.threads is None else args.threads)
    if args.compile:
        print(f"compiled the decoding steps in {engine.compile_seconds:.1f} s", file=sys.stderr)
    pool = engine.pool
    print(f"serving {engine.name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}; KV cache: {pool.num_blocks} "
          f"blocks of {pool.block_size} positions, batches of up to {args.max_batch_size}",
          flush=True)
    cache = expert_cache(engine.model)
    if cache is not None:
        print(f"experts offloaded: {cache.num_slots} of them in memory at once "
              f"({cache.num_slots * cache.expert_bytes:,} bytes of --expert-memory "
              f"{cache.budget_bytes:,})", flush=True)
    serving.serve(engine, args.host, args.port, args.api_key, args.max_request_bytes,
                  max_streams_per_client=args.max_streams_per_client,
                  shutdown_timeout=args.shutdown_timeout)
    if engine.scheduler.failure is not None:
        print(f"moekit serve: stopped: {engine.scheduler.failure}", file=sys.stderr)
        return 1
    return 0
