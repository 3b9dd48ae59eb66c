"""`moekit upcycle`, `moekit import`, `moekit export`: conversion between dense checkpoints,
moekit folders and Hugging Face folders."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from moekit.cli.paths import input_option, output_option
from moekit.cli.values import byte_size
from moekit.config import MoEConfig
from moekit.convert import LAYOUTS, import_hf, upcycle
from moekit.convert.hf_folder import DEFAULT_MAX_SHARD_BYTES, export_hf_folder, load_moekit_or_hf
from moekit.model import save_model
from moekit.plan import upcycle_or_scratch
from moekit.train.checkpoint import resolve_checkpoint

# Each dtype under torch's name and under the short one `train --precision` uses.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _byte_bar(description: str):
    """Yield a progress callback (bytes written, total) that draws a bar on a terminal's
    stderr; elsewhere it draws nothing."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    console = Console(stderr=True)
    with Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def advance(written: int, total: int) -> None:
            bar.update(task, advance=written, total=total)
        yield advance


def _folder_command(subcommands, name: str, source: str, run, **texts):
    """A command that reads the folder ``--from`` and writes the folder ``--out``."""
    parser = subcommands.add_parser(name, **texts)
    input_option(parser, "--from", dest="source", required=True, metavar="DIR", help=source)
    output_option(parser, "--out", required=True,
                  help="the folder to write (built beside it and renamed into place; an "
                  "existing one only with --overwrite)")
    parser.set_defaults(run=run)
    return parser


def register(subcommands) -> None:
    upcycle_parser = _folder_command(
        subcommands, "upcycle", "a moekit checkpoint or run folder, or a local Hugging Face dense "
        "checkpoint (Llama, Mistral or Qwen2 layout)", run_upcycle,
        help="turn a dense checkpoint into an MoE model (Skywork-MoE upcycling)",
        description="Every expert starts as a copy of the dense FFN, the router fresh: at "
                    "initialisation the MoE model gives the dense model's logits. With "
                    "--dense-tokens and --moe-tokens it prints whether upcycling or training "
                    "from scratch pays (Skywork-MoE's rule).")
    upcycle_parser.add_argument("--experts", type=int, required=True,
                                help="number of experts (before --granularity)")
    upcycle_parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    upcycle_parser.add_argument("--granularity", type=int, default=1,
                                help="split each expert into G slices, top-k times G "
                                     "(fine-grained; active FLOPs unchanged)")
    upcycle_parser.add_argument("--shared-experts", type=int, default=0,
                                help="a shared expert that starts as the dense FFN (1, or 0)")
    upcycle_parser.add_argument("--noise-std", type=float, default=0.0,
                                help="noise on each expert copy, relative to each weight's std")
    upcycle_parser.add_argument("--router-init-std", type=float, default=None,
                                help="std of the new router (default 1/sqrt(hidden_size))")
    upcycle_parser.add_argument("--moe-every", type=int, default=None,
                                help="make every n-th layer MoE (default 1: all)")
    upcycle_parser.add_argument("--seed", type=int, default=0)
    upcycle_parser.add_argument("--dense-tokens", type=float, default=None,
                                help="tokens that trained the dense model")
    upcycle_parser.add_argument("--moe-tokens", type=float, default=None,
                                help="tokens planned for training the MoE model")

    import_parser = _folder_command(
        subcommands, "import", "a local Hugging Face checkpoint folder", run_import,
        help="a local Hugging Face checkpoint -> a moekit folder",
        description="Reads config.json and the safetensors weights (sharded too) of a folder "
                    f"whose model_type is one of {', '.join(LAYOUTS)} (docs/convert.md: what "
                    "each holds, and the families refused); the tokenizer and chat template "
                    "come along. The weights stream: memory-mapped and written tensor by "
                    "tensor (memory stays near one stacked expert tensor, whatever the "
                    "checkpoint's size), with a progress bar on a terminal. Block-wise FP8 "
                    "weights (DeepSeek-V3's weight_scale_inv) are dequantized; other "
                    "quantizations, configs that need trust_remote_code (auto_map) and "
                    "features the model cannot hold are refused in one line naming the key.")
    import_parser.add_argument("--dtype", choices=DTYPES, default=None,
                               help="the dtype to write: bfloat16 (bf16) keeps a bf16 "
                               "checkpoint as it is (default: the dtype of the stored "
                               "embedding)")

    export_parser = _folder_command(
        subcommands, "export", "a moekit checkpoint or run folder", run_export,
        help="a moekit folder -> a Hugging Face folder transformers loads",
        description="Writes config.json, model.safetensors and the tokenizer files in the "
                    "chosen layout; refuses a model feature the layout cannot hold. The "
                    "weights stream from the memory-mapped folder, tensor by tensor, shard by "
                    "shard. A LoRA run exports its base model and, in OUT/adapter/, a PEFT "
                    "adapter.")
    export_parser.add_argument("--layout", required=True, choices=LAYOUTS)
    export_parser.add_argument("--max-shard-size", type=byte_size,
                               default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                               help="split the weights into shards of at most SIZE (e.g. 5GB, "
                               "2GiB) with an index, as transformers does (default: 50GB, the "
                               "Hub's limit per file)")
    export_parser.add_argument("--merge-lora", action="store_true",
                               help="of a LoRA run (moekit sft/dpo --lora-rank): write the "
                               "weights with the adapters merged in, instead of the base model "
                               "plus a PEFT adapter in OUT/adapter/")


def _print_advice(dense, moe_model, dense_tokens: float, moe_tokens: float) -> None:
    advice = upcycle_or_scratch(dense.config, moe_model.config, dense_tokens, moe_tokens)
    print("compute = (6 (N + V D) + attention) FLOPs per token x tokens, as moekit plan "
          "counts it (docs/plan.md)")
    print(f"  dense: {dense_tokens:.3g} tokens = {advice.dense_training_flops:.3e} FLOPs")
    print(f"  MoE:   {moe_tokens:.3g} tokens = {advice.moe_training_flops:.3e} FLOPs")
    print(f"advice: {advice.recommendation}: {advice.reason}")


def run_upcycle(args: argparse.Namespace) -> int:
    tokens = (args.dense_tokens, args.moe_tokens)
    if (tokens[0] is None) != (tokens[1] is None):
        raise ValueError("--dense-tokens and --moe-tokens go together: the advice compares the "
                         "compute of both")
    args.source = str(resolve_checkpoint(args.source))  # a run folder: its newest checkpoint
    dense = load_moekit_or_hf(args.source)
    config = dense.config
    moe = MoEConfig(hidden_size=config.hidden_size, ffn_size=config.ffn_size,
                    num_experts=args.experts, top_k=args.top_k, activation=config.activation,
                    num_shared_experts=args.shared_experts)
    model = upcycle(dense, moe, noise_std=args.noise_std, granularity=args.granularity,
                    seed=args.seed, router_init_std=args.router_init_std,
                    moe_every=args.moe_every)
    save_model(model, args.out, extra={"upcycled_from": args.source}, tokenizer_from=args.source)
    final = model.config
    print(f"wrote {args.out}: {final.moe.num_experts} experts of width {final.moe.ffn_size}, "
          f"top-{final.moe.top_k}, in {sum(map(final.is_moe_layer, range(final.num_layers)))} "
          f"of {final.num_layers} layers; {sum(p.numel() for p in model.parameters()):,} "
          "parameters")
    if tokens[0] is None:
        print("pass --dense-tokens and --moe-tokens for the upcycle-or-scratch advice")
    else:
        _print_advice(dense, model, *tokens)
    return 0


def run_import(args: argparse.Namespace) -> int:
    with _byte_bar("import") as progress:
        imported = import_hf(args.source, args.out, DTYPES.get(args.dtype), progress)
    print(f"wrote {args.out}: {imported.parameters:,} parameters, "
          f"{str(imported.dtype).removeprefix('torch.')}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from moekit.convert.peft_adapter import peft_tensors, write_peft_adapter
    from moekit.files import read_safetensors
    from moekit.model.io import read_config
    from moekit.train.lora import ADAPTER_FILE
    from moekit.train.post_train import SETTINGS_KEY
    source = resolve_checkpoint(args.source)
    post_training = read_config(source).get(SETTINGS_KEY) or {}
    lora = post_training.get("lora")
    if args.merge_lora and lora is None:
        raise ValueError(f"--merge-lora: {source} holds no LoRA adapters (its weights are "
                         "written as they are without it)")
    # A LoRA checkpoint's model.safetensors is merged; unmerged, the base model is exported.
    base_and_adapter = lora is not None and not args.merge_lora
    if base_and_adapter:
        adapters = read_safetensors(source / ADAPTER_FILE)
        peft_tensors(adapters, args.layout)  # refuses what PEFT cannot hold, before writing
    with _byte_bar("export") as progress:
        export_hf_folder(post_training["init_from"] if base_and_adapter else source, args.out, args.layout, tokenizer_from=source,
                         max_shard_bytes=args.max_shard_size, progress=progress)
    if base_and_adapter:  # the adapters as PEFT's
        write_peft_adapter(adapters, lora["rank"], lora["alpha"] or 2 * lora["rank"],
                           args.layout, Path(args.out) / "adapter", base_model=str(args.out))
        print(f"wrote {Path(args.out) / 'adapter'}: peft.PeftModel.from_pretrained(model, "
              f"{str(Path(args.out) / 'adapter')!r}) puts the LoRA adapters on it")
    print(f"wrote {args.out}: transformers.AutoModelForCausalLM.from_pretrained("
          f"{args.out!r}) loads it")
    return 0
