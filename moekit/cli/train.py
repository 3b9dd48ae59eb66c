"""`moekit train`, `moekit generate`, `moekit eval`."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, fields, replace

from moekit.cli.paths import input_option, output_option
from moekit.cli.options import collective_timeout_option, expert_memory_option, nproc_option
from moekit.cli.values import positive_float, positive_int
from moekit.config import (EXPERT_LR_RULES, LB_SCOPES, OPTIMIZER_IMPLS, PRECISIONS, PRESETS,
                           DataConfig, ExpertParallelConfig, ModelConfig, TrainConfig, preset,
                           read_config_file)
from moekit.devices import DEVICE_CHOICES, resolve_device, retain_freed_cpu_memory
from moekit.parallel.launch import launch, without_nproc
from moekit.model.io import read_model_config
from moekit.parallel.mesh import (CollectiveError, Mesh, launched_by_torchrun,
                                  mesh_from_environment, torchrun_world_size)
from moekit.plan import DEVICES
from moekit.plan import device as plan_device

# Flags that override TrainConfig / DataConfig fields: flag name -> (type, help).
TRAIN_FLAGS = {
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per step"),
    "grad_accum": (int, "micro-batches per step (gradient accumulation)"),
    "seq_len": (int, "tokens per sequence"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "the cosine ends at lr * this"),
    "warmup_steps": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay of matrices"),
    "grad_clip": (float, "max global gradient norm"),
    "expert_lr_rule": (str, "routed experts' learning rate rule (docs/train.md)"),
    "precision": (str, "bf16 = autocast; weights and optimizer stay fp32"),
    "lb_scope": (str, "over what the balance and z-losses are formed: micro (each "
                 "micro-batch), global (counts summed over ranks and micro-batches so far), "
                 "step (the whole global batch, from a routing pre-pass); docs/correctness.md"),
    "recompute": (bool, "activation checkpointing of every layer: about one more forward per "
                  "step for the activations' memory"),
    "deterministic": (bool, "deterministic kernels only (torch.use_deterministic_algorithms): "
                      "bit-identical repeats on a GPU; a CPU run repeats without it"),
    "optimizer_impl": (str, "AdamW kernel: auto = fused where the device has it, else foreach; "
                       "all give the same update to float rounding"),
    "eval_every": (int, "steps between validations"),
    "eval_batches": (int, "batches per validation"),
    "similarity_every": (int, "steps between measurements of expert_similarity (mean pairwise "
                         "cosine of each layer's expert weights) in metrics.jsonl; 0 = never"),
    "checkpoint_every": (int, "steps between checkpoints"),
    "keep_checkpoints": (int, "how many checkpoints to keep"),
    "seed": (int, "seed of initialisation and batches"),
    "long_fraction": (float, "share of each step's windows drawn from documents at least "
                      "seq_len + 1 tokens long: the long-context stage (Hunyuan-Large: 0.25)"),
}
DATA_FLAGS = {
    "vocab_size": (int, "tokenizer vocabulary (257 = plain bytes)"),
    "val_fraction": (float, "share of every document held out for validation"),
}


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (_merge(merged[key], value) if isinstance(value, dict)
                       and isinstance(merged.get(key), dict) else value)
    return merged


def model_config_of(preset_name: str | None, file: dict) -> ModelConfig:
    """The model of a preset (default tiny) with a config file's ``model`` section over it."""
    name = preset_name or file.get("preset") or "tiny"
    return ModelConfig.from_dict(_merge(preset(name).to_dict(), file.get("model", {})))


def _configs(args) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Preset < config file < flags; no model config with --init-from."""
    file = read_config_file(args.config) if args.config else {}
    unknown = sorted(set(file) - {"preset", "model", "train", "data"})
    if unknown:
        raise ValueError(f"config file {args.config!r}: unknown sections {unknown}; allowed: "
                         "preset, model, train, data")
    if args.init_from:  # the model comes from that folder
        if args.preset or args.dense or "model" in file or "preset" in file:
            raise ValueError("--init-from brings its own model: drop --preset, --dense and the "
                             "config file's preset and model")
        model = None
    else:
        model = model_config_of(args.preset, file)
        if args.dense:
            model = model.dense()
        if args.rope_base:
            model = replace(model, rope_base=args.rope_base)
    train = {**file.get("train", {}), **{key: getattr(args, key) for key in TRAIN_FLAGS
                                         if getattr(args, key) is not None}}
    data = {**file.get("data", {}), **{key: getattr(args, key) for key in DATA_FLAGS
                                       if getattr(args, key) is not None}}
    if args.corpus:
        data["corpus"] = args.corpus
    return model, TrainConfig.from_dict(train), DataConfig.from_dict(data)


def check_layout(configs, world: int, args) -> tuple | None:
    """The layers per pipeline stage of the layout the flags ask for on ``world`` processes,
    checked against the model and the batch (``configs()``, read only when there is a layout
    to check) before any process or file exists."""
    from moekit.parallel.mesh import check_tensor_degree
    from moekit.parallel.pipeline import check_pipeline_model
    from moekit.parallel.tensor_parallel import check_tensor_model
    from moekit.plan import Layout
    from moekit.train.step import check_batch_split
    check_tensor_degree(args.tensor, args.expert)
    layout = Layout.for_world(world, tensor=args.tensor, pipeline=args.pipeline,
                              expert=args.expert,
                              stage_layers=tuple(args.stage_layers) if args.stage_layers else None)
    if layout.world_size == 1:
        return None  # one process: the loop checks the rest (a resumed run once it holds it)
    model, train = configs()
    stages = layout.stages(model)
    check_pipeline_model(model, layout.pipeline)
    check_tensor_model(model, layout.tensor)
    check_batch_split(train, layout.data)
    if layout.pipeline > 1 and train.grad_accum < layout.pipeline:
        print(f"moekit train: note: {train.grad_accum} micro-batches on {layout.pipeline} "
              "stages leave most of each step idle (a GPipe schedule); --grad-accum "
              f"{layout.pipeline} or more runs 1F1B with smaller bubbles", file=sys.stderr)
    return stages


def _expert_options(args) -> ExpertParallelConfig:
    """FasterMoE's options of the expert-parallel exchange; they need --expert > 1."""
    options = ExpertParallelConfig(overlap=args.ep_overlap, shadow=args.ep_shadow,
                                   link_gbps=args.ep_link_gbps,
                                   expert_gflops=args.ep_expert_gflops)
    flag = "--ep-overlap" if options.overlap else "--ep-shadow"
    if (options.overlap or options.shadow) and args.expert == 1:
        raise ValueError(f"{flag} is not allowed with --expert 1: it changes how experts spread "
                         "over ranks exchange rows (set --expert E > 1)")
    if (options.overlap or options.shadow) and args.tensor > 1:
        raise ValueError(f"{flag} is not allowed with --tensor {args.tensor}: expert data "
                         "parallelism exchanges no rows (drop one of them)")
    return options


@dataclass(frozen=True)
class ParallelLayout:
    """The processes' layout the parallel flags ask for (add_parallel_options), checked before
    any process or file exists; ``mesh(device)`` makes it in each process."""
    args: argparse.Namespace
    stages: tuple | None
    expert_options: ExpertParallelConfig

    @classmethod
    def from_args(cls, args, world: int, configs) -> "ParallelLayout":
        """``configs()`` gives the (model, train) configs, read only when a layout of several
        processes needs checking against them."""
        expert_options = _expert_options(args)
        if args.stage_layers and len(args.stage_layers) != args.pipeline:
            raise ValueError(f"--stage-layers {' '.join(map(str, args.stage_layers))} is not "
                             f"allowed: expected {args.pipeline} layer counts, one per stage "
                             f"of --pipeline {args.pipeline}")
        return cls(args, check_layout(configs, world, args), expert_options)

    def mesh(self, device) -> Mesh:
        args = self.args
        return replace(mesh_from_environment(device, args.collective_timeout, args.expert,
                                             args.pipeline, self.stages, args.tensor),
                       zero=args.zero, expert_options=self.expert_options)


def run_train(args) -> int:
    from moekit.train.loop import train
    from moekit.train.checkpoint import resolve_checkpoint
    retain_freed_cpu_memory(training=True)
    device = resolve_device(args.device)
    if args.init_from:  # a run folder (a previous stage) starts from its newest checkpoint
        args.init_from = str(resolve_checkpoint(args.init_from))
    if args.resume:
        # --steps may extend the run (moekit.train.optim.extend_schedule); nothing else changes
        settings = ["config", "preset", "corpus", "dense", "overwrite", "init_from", "rope_base",
                    *(key for key in TRAIN_FLAGS if key != "steps"), *DATA_FLAGS]
        given = [f"--{key.replace('_', '-')}" for key in settings
                 if getattr(args, key) not in (None, False)]
        if given:
            raise ValueError("--resume continues a run with the configuration saved in it "
                             f"(--steps may extend it); drop {' '.join(given)}")
        model, train_config, data = None, None, None
    else:
        model, train_config, data = _configs(args)
    out = args.out or f"runs/{args.preset or 'tiny'}"
    world = args.nproc if args.nproc is not None else torchrun_world_size()

    def configs_for_layout():
        if args.resume:
            from moekit.train.loop import read_run
            return read_run(out)[:2]
        return (model if model is not None else read_model_config(args.init_from)), train_config

    layout = ParallelLayout.from_args(args, world, configs_for_layout)
    if args.nproc is not None:
        if launched_by_torchrun():
            raise ValueError("--nproc starts the processes itself: under torchrun, drop it "
                             "(torchrun's --nproc-per-node sets them)")
        return launch(args.nproc, without_nproc(args.argv))
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else (
        plan_device(args.peak_device).peak_tflops * 1e12 if args.peak_device else None)
    mesh = layout.mesh(device)
    try:
        result = train(model, train_config, data, out, resume=args.resume,
                       overwrite=args.overwrite, init_from=args.init_from, device=device,
                       peak_flops=peak_flops, steps=args.steps if args.resume else None,
                       show_progress=not args.quiet, mesh=mesh,
                       model_overrides={"rope_base": args.rope_base}
                       if args.rope_base and args.init_from else None)
    except KeyboardInterrupt as stop:
        if mesh.is_main:
            print(f"moekit train: {stop or 'interrupted'}; continue with: moekit train --out "
                  f"{out} --resume", file=sys.stderr)
        return 130
    except CollectiveError as error:  # every rank says what it was doing when the run broke
        print(f"moekit train: {error}; the last checkpoint is intact: moekit train --out {out} "
              "--resume", file=sys.stderr)
        return 1
    finally:
        mesh.close()
    if mesh.is_main:
        print(f"trained {result.step} steps: training loss {result.train_loss:.3f}, validation "
              f"loss {result.val_loss:.3f} (perplexity {math.exp(result.val_loss):.1f})")
        print(f"checkpoint: {result.checkpoint}   plots: {result.run / 'plots'}")
    return 0


def _load(args, expert_memory: int | None = None):
    """The checkpoint folder (quantized or not), its model (its experts offloaded where the
    command has --expert-memory) and its tokenizer."""
    from moekit.parallel import load_for_serving
    from moekit.train.checkpoint import resolve_checkpoint
    from moekit.train.tokenizer import load_tokenizer
    folder = resolve_checkpoint(args.checkpoint)
    model = load_for_serving(folder, resolve_device(args.device), expert_memory)
    return folder, model, load_tokenizer(folder)


def run_generate(args) -> int:
    from moekit.model.decode_step import DecodeStep
    from moekit.model.generate import generate
    if args.packed and args.expert_memory is not None:
        raise ValueError("--packed does not go with --expert-memory: packing copies the "
                         "resident weights out of the mapped checkpoint into the process's "
                         "own memory, which --expert-memory budgets")
    _, model, tokenizer = _load(args, args.expert_memory)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    if any(not ids for ids in prompts):
        raise ValueError("--prompt must not be empty")
    if args.packed:
        from moekit.model.packed import pack_for_decoding
        pack_for_decoding(model, rows=len(prompts))
    step = DecodeStep(model, compile=args.compile)
    if args.compile:
        longest = max(len(ids) for ids in prompts)
        seconds = step.prepare(len(prompts), longest + args.max_new_tokens)
        print(f"compiled the decoding step in {seconds:.1f} s", file=sys.stderr)
    outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id,
                       seed=args.seed, step=step)
    for text, ids in zip(args.prompt, outputs):
        print(text + tokenizer.decode(ids))
        if len(args.prompt) > 1:
            print("---")
    return 0


def run_eval(args) -> int:
    import torch

    from moekit.model.io import read_config
    from moekit.train.data import read_documents, split_tokens
    from moekit.train.loop import validation_loss
    folder, model, tokenizer = _load(args)
    saved = read_config(folder)
    train_config = TrainConfig.from_dict(saved.get("train", {}))
    overrides = {k: getattr(args, k) for k in ("seq_len", "batch_size", "eval_batches")
                 if getattr(args, k) is not None}
    train_config = TrainConfig.from_dict({**asdict(train_config), **overrides,
                                          "grad_accum": 1})
    if args.corpus:
        documents = read_documents(args.corpus)
        tokens = torch.tensor([t for ids in tokenizer.encode_batch(documents)
                               for t in ids + [tokenizer.eos_id]])
        what = ", ".join(args.corpus)
    else:
        data = DataConfig.from_dict(saved.get("data", {}))
        tokens = split_tokens(read_documents(data.corpus), tokenizer, data.val_fraction).val
        what = "the validation split of its training corpus"
    if tokens.numel() < train_config.seq_len + 1:
        raise ValueError(f"{what} has {tokens.numel()} tokens, fewer than seq_len + 1 = "
                         f"{train_config.seq_len + 1}")
    loss = validation_loss(model, tokens, train_config, next(model.parameters()).device)
    print(f"{folder} on {what}: loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run (auto: cuda, then mps, then cpu)")


def _checkpoint_command(subcommands, name: str, run, **texts) -> argparse.ArgumentParser:
    """A command that reads a checkpoint (or run) folder on a device."""
    parser = subcommands.add_parser(name, **texts)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    _common(parser)
    parser.set_defaults(run=run)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, flags: dict,
                     defaults: dict | None = None) -> None:
    """Add the flags that override TrainConfig / DataConfig fields (``defaults``: the command's
    own defaults where they differ from the configs')."""
    for key, (kind, text) in flags.items():
        default = (defaults or {}).get(key, next(
            f.default for cls in (TrainConfig, DataConfig) for f in fields(cls) if f.name == key))
        flag = f"--{key.replace('_', '-')}"
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=text)
            continue
        choices = {"expert_lr_rule": EXPERT_LR_RULES, "precision": PRECISIONS,
                   "optimizer_impl": OPTIMIZER_IMPLS, "lb_scope": LB_SCOPES}.get(key)
        parser.add_argument(flag, type=kind, choices=choices, help=f"{text} (default {default})")


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    """--nproc, --expert, --tensor, --pipeline, --stage-layers, --zero and
    --collective-timeout."""
    parallel = parser.add_argument_group(
        "several processes (data, expert, expert-data, pipeline parallel, ZeRO-1/2/3; "
        "docs/parallel.md)",
        "torchrun --nproc-per-node N -m moekit COMMAND ... runs the same command on N processes "
        "(several machines: torchrun's --nnodes and --rdzv-endpoint); --nproc N starts them "
        "here. gloo on CPU, NCCL with one process per GPU.")
    nproc_option(parallel)
    parallel.add_argument("--expert", type=positive_int, default=1, metavar="E",
                          help="expert parallelism: each MoE layer's experts spread over groups "
                          "of E processes (E divides the experts and a pipeline stage's "
                          "processes; default 1)")
    parallel.add_argument("--tensor", type=positive_int, default=1, metavar="T",
                          help="expert data parallelism (Skywork-MoE's EDP, with --expert T): "
                          "groups of T processes share their rows, attention and dense MLPs "
                          "tensor-parallel over the group and each layer's experts spread over "
                          "it, so tokens never leave the group (default 1)")
    parallel.add_argument("--pipeline", type=positive_int, default=1, metavar="P",
                          help="pipeline parallelism: the layers cut into P stages of "
                          "consecutive layers, one per group of processes (P divides the "
                          "processes; the data-parallel degree is processes / (P x T)), run by "
                          "a 1F1B schedule over the step's --grad-accum micro-batches (default 1)")
    parallel.add_argument("--stage-layers", type=positive_int, nargs="+", metavar="N",
                          help="layers of each pipeline stage, e.g. 5 3 (default: an even split; "
                          "moekit plan --pipeline P prints Skywork-MoE's cost-balanced one)")
    parallel.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0,
                          help="shard over the data-parallel ranks: 1 the optimizer state "
                          "(ZeRO-1, as Skywork-MoE trained: ZeroRedundancyOptimizer over DDP; "
                          "with --expert each expert's over its replicas), 2 the gradients and "
                          "optimizer state (a block's parameters whole from its forward to its "
                          "backward), 3 the parameters too (FSDP2's fully_shard over a stage's "
                          "data-parallel ranks; with --expert each layer's experts over the "
                          "ranks holding them, with --tensor the tensor-parallel weights over "
                          "their replicas too). Default 0: plain DDP; docs/parallel.md")
    parallel.add_argument("--ep-overlap", action="store_true",
                          help="FasterMoE's smart schedule: the expert-parallel exchange in "
                          "chunks per peer, in ring order, the experts computing on each arrived "
                          "chunk while the next travels (same results)")
    parallel.add_argument("--ep-shadow", action="store_true",
                          help="FasterMoE's shadowing: each step, hot experts' weights go to "
                          "every rank instead of their tokens, chosen by a cost model from the "
                          "per-expert loads (docs/parallel.md); needs the built-in experts")
    parallel.add_argument("--ep-link-gbps", type=positive_float,
                          default=ExpertParallelConfig.link_gbps, metavar="GB/S",
                          help="shadowing's cost model: bandwidth between ranks, 10^9 bytes/s "
                          f"(default {ExpertParallelConfig.link_gbps}: gloo on a 2-core CPU)")
    parallel.add_argument("--ep-expert-gflops", type=positive_float,
                          default=ExpertParallelConfig.expert_gflops, metavar="GFLOP/S",
                          help="shadowing's cost model: expert matmul rate of one rank "
                          f"(default {ExpertParallelConfig.expert_gflops})")
    collective_timeout_option(parallel)


def register(subcommands) -> None:
    train = subcommands.add_parser(
        "train", help="train a model (default: the tiny MoE on the embedded corpus)",
        description="Train a decoder-only MoE (or dense) model. Settings come from a preset, "
        "then a config file (TOML/YAML/JSON with sections preset, model, train, data), then "
        "flags. The run folder gets run.json (resolved config, versions, git revision), "
        "tokenizer.json, metrics.jsonl, plots/ and checkpoints/. Ctrl-C saves a checkpoint "
        "and stops; --resume continues exactly where the last checkpoint left off.")
    train.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default tiny)")
    input_option(train, "--config", help="config file (.toml, .yaml, .json)")
    output_option(train, "--out", in_place_when="resume",
                  help="run folder (default runs/PRESET); an existing one only with --resume "
                  "or --overwrite")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (with --steps: extend it)")
    input_option(train, "--init-from", metavar="DIR",
                 help="start from this model folder's model, weights and tokenizer "
                 "(e.g. the output of moekit upcycle), or a run folder's newest checkpoint")
    train.add_argument("--rope-base", type=positive_float, metavar="B",
                       help="RoPE base; with --init-from, the model continues with it: a "
                       "long-context stage, with a longer --seq-len (which raises the model's "
                       "context to it) and --long-fraction (docs/train.md)")
    train.add_argument("--dense", action="store_true",
                       help="train the dense variant of the model (every FFN dense)")
    input_option(train, "--corpus", nargs="+", metavar="PATH",
                 help="text/markdown/JSONL files or folders (default: the embedded corpus)")
    add_config_flags(train, {**TRAIN_FLAGS, **DATA_FLAGS})
    peak = train.add_mutually_exclusive_group()
    peak.add_argument("--peak-tflops", type=float,
                      help="the device's peak TFLOP/s, to report MFU")
    peak.add_argument("--peak-device", choices=sorted(DEVICES),
                      help="report MFU against this device's dense BF16 peak")
    train.add_argument("--quiet", action="store_true", help="no progress display")
    add_parallel_options(train)
    _common(train)
    train.set_defaults(run=run_train)

    generate = _checkpoint_command(
        subcommands, "generate", run_generate, help="continue prompts with a trained model",
        description="Generate text with KV-cache decoding. --checkpoint is a checkpoint folder "
        "or a run folder (its newest checkpoint). Temperature 0 is greedy.")
    generate.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=positive_int, default=None)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                          help="compile the decoding step with torch.compile (static shapes, "
                          "a fixed-size KV cache) before generating; the compilation, timed "
                          "on stderr, takes tens of seconds to minutes on a CPU, so it pays "
                          "for long generations only (docs/inference.md, Speed; default off)")
    generate.add_argument("--packed", action=argparse.BooleanOptionalAction, default=False,
                          help="decode on weights packed once, on a CPU, for oneDNN's products "
                          "of as many rows as there are prompts (moekit.model.packed): faster "
                          "in bf16 from a few prompts on, in fp32 at about 16, slower for one; "
                          "not with --expert-memory (docs/inference.md, Decoding on packed "
                          "weights; default off)")
    expert_memory_option(generate)

    evaluate = _checkpoint_command(
        subcommands, "eval", run_eval, help="perplexity of a checkpoint",
        description="Mean cross-entropy and perplexity of a checkpoint (dropless), on the "
        "validation split of the corpus it was trained on, or on --corpus.")
    evaluate.add_argument("--corpus", nargs="+", metavar="PATH", help="evaluate on these files")
    evaluate.add_argument("--seq-len", type=positive_int)
    evaluate.add_argument("--batch-size", type=positive_int)
    evaluate.add_argument("--eval-batches", type=positive_int, help="at most this many batches")
