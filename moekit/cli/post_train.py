"""`moekit sft` and `moekit dpo`: post-training from a model folder (docs/post_training.md)."""
from __future__ import annotations

import math
import sys
from dataclasses import replace

from moekit.cli.paths import input_option, output_option
from moekit.cli.train import (TRAIN_FLAGS, ParallelLayout, _common, add_config_flags,
                              add_parallel_options)
from moekit.cli.values import positive_float, positive_int
from moekit.config import TrainConfig
from moekit.devices import resolve_device, retain_freed_cpu_memory
from moekit.parallel.launch import launch, without_nproc
from moekit.parallel.mesh import CollectiveError, launched_by_torchrun, torchrun_world_size

# Fine-tuning defaults where they differ from pre-training's (TrainConfig).
DEFAULTS = {"steps": 200, "lr": 1e-3, "warmup_steps": 10, "eval_every": 50,
            "checkpoint_every": 100, "batch_size": 16, "seq_len": 128}
# train's flags, less the long-context stage's (a pre-training batch mix)
FLAGS = {key: flag for key, flag in TRAIN_FLAGS.items() if key != "long_fraction"}
REWARD_DEFAULT = "moekit.train.instructions:exact_answer_reward"
ONLINE_PROMPTS = 4


def _train_config(args) -> TrainConfig:
    given = {key: getattr(args, key) for key in FLAGS if getattr(args, key) is not None}
    return TrainConfig.from_dict({**DEFAULTS, **given})


def _settings(args):
    from moekit.train.checkpoint import resolve_checkpoint
    from moekit.train.lora import LoRAConfig
    from moekit.train.post_train import PostTrainSettings
    model = {key: getattr(args, key) for key in ("attention_dropout", "hidden_dropout")
             if getattr(args, key) is not None}
    options = {key: getattr(args, key) for key in
               ("schedule", "beta", "sft_weight", "online", "online_prompts", "samples",
                "reward", "temperature", "precompute_reference")
               if getattr(args, key, None) not in (None, False)}
    return PostTrainSettings(
        stage=args.command, init_from=str(resolve_checkpoint(args.init_from)), data=args.data,
        lora=LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_router)
        if args.lora_rank is not None else None,
        ema_decay=args.ema_decay, model=model, options=options)


def _split(items: list, path: str, what: str) -> tuple[list, list]:
    """A data file's records less its last tenth, and that tenth (held out)."""
    if len(items) < 2:
        raise ValueError(f"{path}: {len(items)} {what}; expected at least 2 (the last tenth "
                         "is held out)")
    cut = max(1, len(items) // 10)
    return items[:-cut], items[-cut:]


def _sft_stage(settings, epochs: int | None):
    from moekit.train.chat_data import read_chat_file
    from moekit.train.instructions import instruction_set
    from moekit.train.sft import SupervisedFineTuning
    if settings.data is None:
        train, held_out = instruction_set()
        return SupervisedFineTuning([x.messages() for x in train],
                                    [x.messages() for x in held_out], held_out, epochs=epochs)
    conversations, validation = _split(read_chat_file(settings.data), settings.data,
                                       "conversations")
    return SupervisedFineTuning(conversations, validation, epochs=epochs)


def _dpo_stage(settings):
    from moekit.train.chat_data import read_preference_file
    from moekit.train.dpo import DirectPreference, load_reward
    from moekit.train.instructions import instruction_set, preference_set
    options = settings.options
    reward = load_reward(options.get("reward", REWARD_DEFAULT))
    if settings.data is None:
        train, held_out = instruction_set()
        pairs, validation, instructions = preference_set(train), preference_set(held_out), \
            held_out
        prompts = [x.messages(False) for x in train]
    else:
        pairs, validation = _split(read_preference_file(settings.data), settings.data, "pairs")
        instructions = []
        # online: the file's own prompts, each once
        prompts = list({tuple((m["role"], m["content"]) for m in pair.prompt): pair.prompt
                        for pair in pairs}.values())
    online = options.get("online_prompts", ONLINE_PROMPTS) if options.get("online") else 0
    return DirectPreference(pairs, validation, beta=options.get("beta", 0.1),
                            sft_weight=options.get("sft_weight", 0.0), prompts=prompts,
                            online_prompts=online, samples=options.get("samples", 4),
                            reward=reward, temperature=options.get("temperature", 1.0),
                            instructions=instructions,
                            precompute_reference=options.get("precompute_reference", False))


def _with_schedule(settings, train_config: TrainConfig, args) -> tuple:
    """A --schedule preset under the flags given: (settings, train config, epochs or None)."""
    from moekit.train.sft import SCHEDULES
    name = settings.options.get("schedule")
    if name is None:
        return settings, train_config, None
    preset = SCHEDULES[name]
    given = {key for key in FLAGS if getattr(args, key, None) is not None}
    train_config = replace(train_config, **{k: v for k, v in preset["train"].items()
                                            if k not in given})
    settings = replace(settings, model={**preset["model"], **settings.model})
    return settings, train_config, None if args.steps is not None else preset["epochs"]


def check_post_training_layout(args, settings) -> None:
    """The parallel layouts sft and dpo run: data and expert parallel and ZeRO. Not a
    pipeline (SFT's packed rows carry document ids, DPO's step is one forward of its pairs),
    not expert data parallelism (their evaluations and online samples generate, and the KV
    cache does not take tensor-parallel attention), and LoRA adapters not with the experts
    spread over ranks (the stacked factors beside them are not split with them)."""
    for flag, value, given in (("--pipeline", args.pipeline, args.pipeline > 1 or
                                args.stage_layers), ("--tensor", args.tensor, args.tensor > 1)):
        if given:
            raise ValueError(f"{flag} {value} is not supported by moekit {args.command}: "
                             "data and expert parallelism (--expert) and --zero are")
    if settings.lora is not None and args.expert > 1:
        raise ValueError(f"--lora-rank with --expert is not supported (--expert "
                         f"{args.expert}): the experts' adapters are not spread with the "
                         "experts (LoRA runs with data parallelism and --zero 0 to 3)")


def run_post_train(args) -> int:
    from moekit.train.ema import check_decay
    from moekit.train.post_train import model_config_for, post_train, read_settings
    retain_freed_cpu_memory(training=True)
    if args.resume:
        given = [f"--{key.replace('_', '-')}" for key in
                 ("init_from", "data", "lora_rank", "ema_decay", "schedule", "online",
                  "precompute_reference",
                  *(k for k in FLAGS if k != "steps"))
                 if getattr(args, key, None) not in (None, False)]
        if given:
            raise ValueError("--resume continues a run with the settings saved in it (--steps "
                             f"may extend it); drop {' '.join(given)}")
        settings, train_config = read_settings(args.out)
        if settings.stage != args.command:
            raise ValueError(f"{args.out} is a {settings.stage} run: continue it with moekit "
                             f"{settings.stage} --resume")
    else:
        if args.init_from is None:
            raise ValueError("--init-from DIR is required (a model folder from moekit train "
                             "or moekit import), unless --resume")
        if args.ema_decay is not None:
            check_decay(args.ema_decay)
        settings, train_config = _settings(args), _train_config(args)
    check_post_training_layout(args, settings)
    epochs = None
    if not args.resume:
        settings, train_config, epochs = _with_schedule(settings, train_config, args)
    # The data is read and checked here, before any model loads.
    stage = _sft_stage(settings, epochs) if args.command == "sft" else _dpo_stage(settings)
    world = args.nproc if args.nproc is not None else torchrun_world_size()
    layout = ParallelLayout.from_args(args, world, lambda: (model_config_for(settings),
                                                            train_config))
    if train_config.batch_size % world:  # refused before any process starts
        raise ValueError(f"batch_size={train_config.batch_size} is not allowed on {world} "
                         f"processes: it must be a multiple of {world}")
    micro_batches = world * train_config.grad_accum
    if args.command == "dpo" and train_config.batch_size - stage.online_prompts < micro_batches:
        raise ValueError(f"--online-prompts {stage.online_prompts} leaves fewer offline pairs "
                         f"per step than the {world} processes x {train_config.grad_accum} "
                         "micro-batches (each needs one): lower it or raise --batch-size")
    if args.nproc is not None:
        if launched_by_torchrun():
            raise ValueError("--nproc starts the processes itself: under torchrun, drop it")
        return launch(args.nproc, without_nproc(args.argv))
    mesh = layout.mesh(resolve_device(args.device))
    try:
        result = post_train(stage, settings, train_config, args.out, resume=args.resume,
                            overwrite=args.overwrite, device=resolve_device(args.device),
                            mesh=mesh, show_progress=not args.quiet,
                            steps=args.steps if args.resume else None)
    except KeyboardInterrupt as stop:
        if mesh.is_main:
            print(f"moekit {args.command}: {stop or 'interrupted'}; continue with: moekit "
                  f"{args.command} --out {args.out} --resume", file=sys.stderr)
        return 130
    except CollectiveError as error:
        print(f"moekit {args.command}: {error}; the last checkpoint is intact: moekit "
              f"{args.command} --out {args.out} --resume", file=sys.stderr)
        return 1
    finally:
        mesh.close()
    if mesh.is_main:
        print(f"{args.command}: {result.step} steps, training loss {result.train_loss:.4f}, "
              f"validation loss {result.val_loss:.4f} (perplexity "
              f"{math.exp(min(result.val_loss, 50)):.2f})")
        print(f"checkpoint: {result.checkpoint}   plots: {result.run / 'plots'}")
    return 0


def _add_common(parser) -> None:
    input_option(parser, "--init-from", metavar="DIR",
                 help="the model folder to start from (moekit train's checkpoint or run, or "
                 "moekit import's folder), with its tokenizer and chat template")
    output_option(parser, "--out", in_place_when="resume", required=True,
                  help="run folder; an existing one only with --resume or --overwrite")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (with --steps: extend it)")
    lora_group = parser.add_argument_group("LoRA (docs/post_training.md)")
    lora_group.add_argument("--lora-rank", type=int, metavar="R",
                            help="train rank-R adapters on attention, routed and shared experts "
                            "(everything else frozen) instead of every weight")
    lora_group.add_argument("--lora-alpha", type=positive_float,
                            help="the adapters' scale is alpha / R (default 2 R)")
    lora_group.add_argument("--lora-router", action="store_true",
                            help="an adapter on each router as well")
    parser.add_argument("--ema-decay", type=float, metavar="D",
                        help="keep an exponential moving average of the trained weights with "
                        "this decay in (0, 1): evaluations use it and the run ends by writing "
                        "it as RUN/ema/ (the policy keeps training and sampling)")
    parser.add_argument("--attention-dropout", type=float,
                        help="attention dropout in training (default the model's, 0)")
    parser.add_argument("--hidden-dropout", type=float,
                        help="dropout of each attention and FFN output in training (default "
                        "the model's, 0)")
    add_config_flags(parser, FLAGS, DEFAULTS)
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    add_parallel_options(parser)
    _common(parser)
    parser.set_defaults(run=run_post_train)


def register(subcommands) -> None:
    from moekit.train.sft import SCHEDULES
    sft = subcommands.add_parser(
        "sft", help="supervised fine-tuning on chat data (loss on assistant tokens)",
        description="Fine-tune a model folder on conversations: the loss on the assistant's "
        "tokens only, router aux losses on, conversations packed into rows with attention kept "
        "within each. Without --data, the embedded instruction set (arithmetic, sorting, "
        "reversal, counting; exact answers) trains and its held-out part is answered at each "
        "evaluation.")
    input_option(sft, "--data", metavar="FILE.jsonl",
                 help='chat JSONL: {"messages": [{"role", "content"}, ...]} per line (the last '
                 "tenth validates); default the embedded instruction set")
    sft.add_argument("--schedule", choices=sorted(SCHEDULES),
                     help="hunyuan: Hunyuan-Large's SFT (3 epochs, lr 2e-5 decaying to 2e-6, "
                     "attention dropout 0.1, hidden dropout 0.2); flags given override it")
    _add_common(sft)

    dpo = subcommands.add_parser(
        "dpo", help="direct preference optimization, offline and online",
        description="DPO against a frozen reference (the starting model; with LoRA the base "
        "with adapters off): chosen and rejected rewards, margin, accuracy and KL logged. "
        "--online adds pairs sampled from the policy each step and ranked by --reward. "
        "Without --data, the embedded instruction set's preference pairs (a correct answer "
        "over a wrong one).")
    input_option(dpo, "--data", metavar="FILE.jsonl",
                 help='preference JSONL: {"prompt", "chosen", "rejected"} per line (the last '
                 "tenth validates); default the embedded preference set")
    dpo.add_argument("--beta", type=positive_float, help="DPO's beta (default 0.1)")
    dpo.add_argument("--sft-weight", type=float,
                     help="weight of an SFT loss on the chosen responses (default 0)")
    dpo.add_argument("--online", action="store_true",
                     help="also train on best/worst pairs of the policy's own samples")
    dpo.add_argument("--online-prompts", type=positive_int, default=None,
                     help="online prompts per step, of the batch's pairs (default "
                     f"{ONLINE_PROMPTS})")
    dpo.add_argument("--samples", type=positive_int,
                     help="responses sampled per online prompt (default 4)")
    dpo.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    dpo.add_argument("--reward", metavar="MODULE:FUNCTION",
                     help=f"reward(prompt, response) -> float for online pairs, called with "
                     f"the last user message (default {REWARD_DEFAULT}, the embedded set's "
                     "exact-answer check); with --data the online prompts are its prompts")
    dpo.add_argument("--precompute-reference", action="store_true",
                     help="score every pair with the reference once before training and free "
                     "the reference model (its memory back; no KL figure is logged then); "
                     "offline only")
    _add_common(dpo)
