"""`moekit quantize`: weight-only FP8/int8 quantization of a checkpoint folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from moekit.cli.paths import input_option, output_option
from moekit.model import load_model, perplexity
from moekit.train.checkpoint import resolve_checkpoint
from moekit.quant import QUANT_DTYPES, folder_bytes, quantize_model, save_quantized, tensor_bytes
from moekit.train.tokenizer import load_tokenizer

CHOICES = (*QUANT_DTYPES, "none")


def register(subcommands) -> None:
    parser = subcommands.add_parser(
        "quantize", help="store a checkpoint's weights in FP8 or int8",
        description="Quantize the weights of a checkpoint (per output channel) and save it. "
                    "--dtype sets experts and attention; embeddings stay in full precision "
                    "unless --embeddings is given.")
    input_option(parser, "--checkpoint", required=True, type=Path,
                 help="moekit model folder, or a run folder (its newest checkpoint)")
    output_option(parser, "--out", required=True, type=Path,
                  help="folder to write (an existing one only with --overwrite)")
    parser.add_argument("--dtype", required=True, choices=tuple(QUANT_DTYPES))
    for part in ("experts", "attention", "embeddings"):
        parser.add_argument(f"--{part}", choices=CHOICES, help=f"override --dtype for {part}")
    input_option(parser, "--text", type=Path,
                 help="text file to measure perplexity on, before and after (needs "
                      "tokenizer.json in the checkpoint)")
    parser.add_argument("--window", type=int, help="perplexity window (default: model context)")
    parser.set_defaults(run=run)


def _part(choice: str | None, default: str | None) -> str | None:
    chosen = choice or default
    return None if chosen == "none" else chosen


def _text_tokens(args) -> list[int] | None:
    if args.text is None:
        return None
    try:
        text = args.text.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--text {args.text}: cannot be read ({error})") from None
    return load_tokenizer(args.checkpoint).encode(text)


def run(args: argparse.Namespace) -> int:
    args.checkpoint = resolve_checkpoint(args.checkpoint)  # a run folder: its newest checkpoint
    tokens = _text_tokens(args)
    model = load_model(args.checkpoint)
    rows = [("bytes on disk", folder_bytes(args.checkpoint)), ("bytes in memory",
                                                                tensor_bytes(model))]
    if tokens is not None:
        rows.append(("perplexity", perplexity(model, tokens, args.window)))
    quantize_model(model, experts=_part(args.experts, args.dtype),
                   attention=_part(args.attention, args.dtype),
                   embeddings=_part(args.embeddings, None))
    save_quantized(model, args.out, tokenizer_from=args.checkpoint)
    after = [folder_bytes(args.out), tensor_bytes(model)]
    if tokens is not None:
        after.append(perplexity(model, tokens, args.window))
    print(f"quantized {args.checkpoint} -> {args.out} ({model.quantization})")
    print(f"{'':16} {'before':>14} {'after':>14} {'change':>9}")
    for (name, before), value in zip(rows, after):
        shown = [f"{v:,}" if isinstance(v, int) else f"{v:.3f}" for v in (before, value)]
        print(f"{name:16} {shown[0]:>14} {shown[1]:>14} {value / before - 1:>+9.2%}")
    return 0
