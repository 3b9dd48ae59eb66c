#!/usr/bin/env python3
"""Tokens/s of one whole training step: moekit beside Hugging Face Mixtral and the dense model,
the columns taking turns in one run, on a CPU.

    python benchmarks/train_step.py                     # E=8 and E=64, Mixtral-shaped, 5 reps
    python benchmarks/train_step.py --shapes e64 --reps 7
    python benchmarks/train_step.py --malloc glibc      # without retain_freed_cpu_memory
    python benchmarks/train_step.py --quick             # a tiny shape: a smoke run in seconds

A step is the one moekit's training loop takes (moekit/train/loop.py, ``_train_step``):
forward, cross-entropy summed over the tokens and divided by their number, plus the router loss;
backward; global-norm clipping at 1.0; AdamW step; ``zero_grad(set_to_none=True)``. Columns:

  moekit                    moekit.model.Transformer, ``build_optimizer``'s default ("auto":
                            fused where torch has the kernel)
  moekit foreach, loop      the same model with ``optimizer_impl`` "foreach" and "loop"
  moekit dense expert mm    every grouped expert matmul replaced by one dense matmul of the same
                            rows and FLOPs (all rows through expert 0's matrix): the step as it
                            would be if 64 experts multiplied as fast as one matrix. Against
                            moekit and dense it says how much of the gap to the dense model the
                            expert matmuls are.
  HF AdamW, HF fused AdamW  transformers' MixtralForCausalLM (experts grouped_mm where it can),
     (own process)          the same weights, its load-balancing loss with moekit's coefficient,
                            torch's default AdamW (a per-tensor loop on CPU) and fused AdamW,
                            both with moekit's lr, betas and weight decay (matrices only).
                            "(own process)" (the default): stepped in a spawned process of its
                            own, with glibc's malloc defaults, as a Hugging Face training
                            process runs; without it (--columns "HF AdamW,..."), in this
                            process, with the memory retention --malloc sets for moekit
  dense                     ``config.dense()`` with FFN width top_k * expert FFN: the same active
                            FLOPs per token

Columns that differ only in the optimizer share one model and one set of AdamW moments (fused,
foreach and loop keep the same state under the same names), so that E=64 fits in 23 GB. The
columns take turns within each round, since a harness that timed one column after another gave
figures that depended on the order (docs/train.md, Speed). Warm-up rounds are discarded;
figures are medians [min-max], ratios are taken within a round. Shared machines are noisy: the
header prints the load, and only ratios within one run compare.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import moekit
import moekit.moe.experts as experts_module
from moekit.config import ModelConfig, MoEConfig, TrainConfig
from moekit.convert.hf import hf_config_from_model, moekit_to_hf_state
from moekit.devices import retain_freed_cpu_memory
from moekit.model import Transformer
from moekit.parallel.mesh import Mesh
from moekit.train.optim import build_optimizer, clipped_step, implementation_of

MOEKIT, MOEKIT_FOREACH, MOEKIT_LOOP = "moekit", "moekit foreach", "moekit loop"
MOEKIT_DENSE_EXPERT_MM = "moekit dense expert mm"
HF_DEFAULT_ADAMW, HF_FUSED_ADAMW = "HF AdamW", "HF fused AdamW"
OWN_PROCESS = " (own process)"
DENSE = "dense"
COLUMNS = (MOEKIT, MOEKIT_FOREACH, MOEKIT_LOOP, MOEKIT_DENSE_EXPERT_MM, HF_DEFAULT_ADAMW,
           HF_FUSED_ADAMW, HF_DEFAULT_ADAMW + OWN_PROCESS, HF_FUSED_ADAMW + OWN_PROCESS, DENSE)
DEFAULT_COLUMNS = tuple(name for name in COLUMNS if name not in (HF_DEFAULT_ADAMW,
                                                                 HF_FUSED_ADAMW))
# name: (numerator, denominator) of a tokens/s ratio
RATIOS = {f"moekit / {hf}": (MOEKIT, hf) for hf in COLUMNS if hf.startswith("HF")}
RATIOS["moekit / dense"] = (MOEKIT, DENSE)
LABEL = max(map(len, RATIOS))  # width of the labels of the lines under the table
PHASES = ("forward+loss", "backward", "clip+AdamW+zero_grad")
MALLOC_SETTINGS = {
    "training": "retain_freed_cpu_memory(training=True): freed memory never trimmed",
    "inference": "retain_freed_cpu_memory(): trimmed above 1 GiB",
    "glibc": "glibc's defaults",
}
TRAIN = TrainConfig()  # lr, betas, weight decay and clipping of every column


@dataclass
class Column:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # ids -> logits, router loss
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def implementation(self) -> str:
        return implementation_of(self.optimizer)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> "StepTimes":
        return train_step(self, inputs, targets)


@dataclass
class StepTimes:
    phases: tuple[float, ...]  # seconds, in the order of PHASES
    page_faults: int
    preemptions: int  # involuntary context switches: another process wanted the cores

    @property
    def seconds(self) -> float:
        return sum(self.phases)


def model_config(args, num_experts: int) -> ModelConfig:
    moe = MoEConfig(hidden_size=args.hidden, ffn_size=args.expert_ffn, num_experts=num_experts,
                    top_k=args.top_k)
    # ffn_size is the width of the dense variant (config.dense()): top_k experts' worth.
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads,
                       ffn_size=args.top_k * args.expert_ffn, max_seq_len=args.seq, moe=moe)


def moekit_forward(model: Transformer):
    def forward(ids):
        out = model(ids)
        return out.logits, out.router_loss
    return forward


def hf_mixtral(config: ModelConfig, hf_state: dict[str, torch.Tensor]):
    """MixtralForCausalLM with the weights ``hf_state`` (moekit's, renamed); experts grouped_mm
    where transformers can dispatch it, else its default."""
    from transformers import MixtralConfig, MixtralForCausalLM
    values = hf_config_from_model(config, "mixtral")
    values.pop("model_type")
    hf_config = MixtralConfig(**values, output_router_logits=True,
                              router_aux_loss_coef=config.moe.aux_loss_coef)
    hf_config._experts_implementation = None  # transformers picks grouped_mm if it can
    model = MixtralForCausalLM(hf_config)
    model.load_state_dict(hf_state)
    return model.train()


def hf_forward(model):
    coefficient = model.config.router_aux_loss_coef

    def forward(ids):
        out = model(input_ids=ids, use_cache=False)
        return out.logits, coefficient * out.aux_loss
    return forward


def hf_adamw(model: nn.Module, fused: bool | None) -> torch.optim.AdamW:
    """torch's AdamW as a Hugging Face user would make it, with moekit's settings."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": TRAIN.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=TRAIN.lr, betas=(TRAIN.beta1, TRAIN.beta2), fused=fused)


def moekit_adamw(model: Transformer, impl: str) -> torch.optim.AdamW:
    return build_optimizer(model, replace(TRAIN, optimizer_impl=impl))


def hf_columns(config: ModelConfig, hf_state: dict, names: list[str]) -> dict[str, Column]:
    """The Hugging Face columns ``names``: one model, and AdamW moments shared."""
    model = hf_mixtral(config, hf_state)
    optimizers = sharing_state([hf_adamw(model, fused=True if name == HF_FUSED_ADAMW else None)
                                for name in names])
    return {name: Column(model, optimizer, hf_forward(model))
            for name, optimizer in zip(names, optimizers)}


class OwnProcessColumn:
    """A Hugging Face column stepped in a process of its own, spawned, so with glibc's malloc
    defaults as a Hugging Face training process has them (this process keeps freed memory as
    ``--malloc`` says, which spares the others' steps the page faults a fresh process takes).
    It takes its turn like the others: each ``step`` runs one step there and returns its times."""

    def __init__(self, connection, name: str, implementation: str):
        self.connection, self.name, self.implementation = connection, name, implementation

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> "StepTimes":
        self.connection.send((self.name, inputs, targets))
        return self.connection.recv()


def own_process_worker(connection, config: ModelConfig, weights_file: str, names: list[str],
                       threads: int, check: tuple[torch.Tensor, torch.Tensor]) -> None:
    from safetensors.torch import load_file
    torch.set_num_threads(threads)
    columns = hf_columns(config, load_file(weights_file), names)
    first = next(iter(columns.values()))
    check_same_logits(first, *check)
    connection.send(({name: column.implementation for name, column in columns.items()},
                     hf_implementations(first.model)))
    while (message := connection.recv()) is not None:
        name, inputs, targets = message
        connection.send(columns[name].step(inputs, targets))


@contextlib.contextmanager
def own_process_columns(config: ModelConfig, hf_state: dict, names: list[str], check):
    """``OwnProcessColumn``s of ``names``, in one spawned process ended on leaving; ``check``:
    token ids and moekit's logits for them, which the process's model must give."""
    import multiprocessing
    import tempfile

    from safetensors.torch import save_file
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    with tempfile.TemporaryDirectory() as folder:
        weights_file = f"{folder}/hf.safetensors"
        save_file({name: t.contiguous() for name, t in hf_state.items()}, weights_file)
        process = context.Process(target=own_process_worker, daemon=True, args=(
            there, config, weights_file, names, torch.get_num_threads(), check))
        process.start()
        try:
            try:
                implementations, hf = here.recv()
            except EOFError:
                raise SystemExit("the Hugging Face process ended before its first step "
                                 "(its error is above)") from None
            yield hf, {f"{name}{OWN_PROCESS}": OwnProcessColumn(here, name, implementations[name])
                       for name in names}
        finally:
            if process.is_alive():
                here.send(None)
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()


def sharing_state(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers, all reading and writing the first one's moments."""
    for optimizer in optimizers[1:]:
        optimizer.state = optimizers[0].state
    return optimizers


@contextlib.contextmanager
def dense_expert_matmuls():
    """Every grouped expert matmul as one dense matmul of the same rows and FLOPs. The weight
    gradient is still a full [E, out, in] tensor (the select's backward writes it), so the
    optimizer and the gradients' memory stay as they are."""
    grouped_linear = experts_module.grouped_linear
    experts_module.grouped_linear = lambda x_NI, w_EOI, tokens_per_expert_E: F.linear(
        x_NI, w_EOI[0])
    try:
        yield
    finally:
        experts_module.grouped_linear = grouped_linear


def build_columns(config: ModelConfig, wanted: list[str], stack: contextlib.ExitStack,
                  check_ids: torch.Tensor) -> tuple[dict, str | None]:
    """The columns ``wanted``, in COLUMNS' order (own-process ones live as long as ``stack``),
    and how transformers computes (None without a Hugging Face column). The Hugging Face
    models must give moekit's logits for ``check_ids``."""
    torch.manual_seed(0)
    moe_model = Transformer(config).train()
    with torch.no_grad():
        expected = moe_model(check_ids).logits
    hf = None
    columns = {}
    moekit_impls = {MOEKIT: "auto", MOEKIT_FOREACH: "foreach", MOEKIT_LOOP: "loop"}
    moekit_names = [name for name in moekit_impls if name in wanted]
    if MOEKIT_DENSE_EXPERT_MM in wanted and MOEKIT not in moekit_names:
        moekit_names.insert(0, MOEKIT)  # it steps with moekit's default optimizer
    optimizers = sharing_state([moekit_adamw(moe_model, moekit_impls[name])
                                for name in moekit_names])
    for name, optimizer in zip(moekit_names, optimizers):
        columns[name] = Column(moe_model, optimizer, moekit_forward(moe_model))
    if MOEKIT_DENSE_EXPERT_MM in wanted:
        columns[MOEKIT_DENSE_EXPERT_MM] = replace(columns[MOEKIT], patch=dense_expert_matmuls)
    hf_names = [name for name in (HF_DEFAULT_ADAMW, HF_FUSED_ADAMW) if name in wanted]
    elsewhere = [name.removesuffix(OWN_PROCESS) for name in wanted if name.endswith(OWN_PROCESS)]
    if hf_names or elsewhere:
        hf_state = moekit_to_hf_state(moe_model.state_dict(), "mixtral")
    if hf_names:
        columns.update(hf_columns(config, hf_state, hf_names))
        check_same_logits(columns[hf_names[0]], check_ids, expected)
        hf = hf_implementations(columns[hf_names[0]].model)
    if elsewhere:
        hf, more = stack.enter_context(own_process_columns(config, hf_state, elsewhere,
                                                           (check_ids, expected)))
        columns.update(more)
    if DENSE in wanted:
        dense_model = Transformer(config.dense()).train()
        columns[DENSE] = Column(dense_model, moekit_adamw(dense_model, "auto"),
                                moekit_forward(dense_model))
    return {name: columns[name] for name in COLUMNS if name in wanted}, hf


def check_same_logits(column: Column, ids: torch.Tensor, expected: torch.Tensor) -> None:
    """moekit and Hugging Face start from the same weights: their logits must agree."""
    with torch.no_grad():
        got, _ = column.forward(ids)
    error = float((got - expected).abs().max() / expected.abs().max())
    if error > 1e-4:
        raise SystemExit(f"Hugging Face's logits differ from moekit's: max rel err {error:.1e}")


def hf_implementations(model) -> str:
    return (f"experts {model.config._experts_implementation}, attention "
            f"{model.config._attn_implementation}")


def train_step(column: Column, inputs: torch.Tensor, targets: torch.Tensor) -> StepTimes:
    before = resource.getrusage(resource.RUSAGE_SELF)
    with column.patch():
        start = time.perf_counter()
        logits, router_loss = column.forward(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                               reduction="sum") / targets.numel() + router_loss
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        # moekit's clipping and update for every column (moekit/train/step.py steps so)
        clipped_step(column.optimizer, column.model, TRAIN.grad_clip, Mesh())
        optimizer_done = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return StepTimes((forward_done - start, backward_done - forward_done,
                      optimizer_done - backward_done),
                     after.ru_minflt - before.ru_minflt, after.ru_nivcsw - before.ru_nivcsw)


def time_interleaved(columns: dict[str, Column], inputs, targets, reps: int,
                     warmup: int) -> dict[str, list[StepTimes]]:
    """Per column, the steps of the timed rounds; every round steps each column once."""
    steps = {name: [] for name in columns}
    for round_index in range(warmup + reps):
        for name, column in columns.items():
            measured = column.step(inputs, targets)
            if round_index >= warmup:
                steps[name].append(measured)
    return steps


def grouped_mm_share(column: Column, inputs, targets) -> float:
    """The share of one profiled step spent in aten::_grouped_mm, forward and backward (with
    what it calls: on a CPU, one mm per expert)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        seconds = train_step(column, inputs, targets).seconds
    grouped_us = sum(event.cpu_time_total for event in profile.key_averages()
                     if event.key == "aten::_grouped_mm")
    return grouped_us / 1e6 / seconds


def median_and_range(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


def preemptions_per_second(steps: dict[str, list[StepTimes]], round_index: int) -> float:
    this_round = [runs[round_index] for runs in steps.values()]
    return (sum(step.preemptions for step in this_round)
            / sum(step.seconds for step in this_round))


def least_contended_round(steps: dict[str, list[StepTimes]]) -> int:
    """The round in which other processes took the cores least often: on a shared machine,
    the nearest to a quiet one."""
    rounds = range(len(next(iter(steps.values()))))
    return min(rounds, key=lambda index: preemptions_per_second(steps, index))


def report(console: Console, title: str, columns: dict[str, Column],
           steps: dict[str, list[StepTimes]], tokens: int) -> None:
    table = Table(title=title)
    for heading in ("column", "tokens/s", "step s", *PHASES, "page faults/step",
                    "preempted/step", "AdamW"):
        table.add_column(heading, justify="left" if heading == "column" else "right")
    for name, runs in steps.items():
        seconds = [run.seconds for run in runs]
        phase_seconds = [statistics.median(run.phases[i] for run in runs)
                         for i in range(len(PHASES))]
        shares = [seconds / sum(phase_seconds) for seconds in phase_seconds]
        faults = statistics.median(run.page_faults for run in runs)
        preemptions = statistics.median(run.preemptions for run in runs)
        table.add_row(name, median_and_range([tokens / s for s in seconds], 0),
                      f"{statistics.median(seconds):.3f}", *(f"{share:.0%}" for share in shares),
                      f"{faults:,.0f}", f"{preemptions:,.0f}",
                      columns[name].implementation)
    console.print(table)

    def per_round(numerator: str, denominator: str) -> list[float]:
        return [b.seconds / a.seconds for a, b in zip(steps[numerator], steps[denominator])]

    quietest = least_contended_round(steps)
    console.print(f"{'ratio':{LABEL}s} median (range) over rounds; in the least preempted round "
                  f"({preemptions_per_second(steps, quietest):.0f} preemptions/s)")
    for label, (numerator, denominator) in RATIOS.items():
        if numerator in steps and denominator in steps:
            ratios = per_round(numerator, denominator)
            console.print(f"{label:{LABEL}s} {median_and_range(ratios, 2)}; {ratios[quietest]:.2f}")
    if all(name in steps for name in (MOEKIT, MOEKIT_DENSE_EXPERT_MM, DENSE)):
        shares = [(moe.seconds - variant.seconds) / (moe.seconds - dense.seconds)
                  for moe, variant, dense in zip(steps[MOEKIT], steps[MOEKIT_DENSE_EXPERT_MM],
                                                 steps[DENSE])]
        console.print(f"{'gap to dense in expert mm':{LABEL}s} {median_and_range(shares, 2)}; "
                      f"{shares[quietest]:.2f}  (moekit - dense expert mm) / (moekit - dense), "
                      "seconds per step")


def machine_header(args) -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"transformers {transformers_version()}, moekit {git_revision()} "
            f"({moekit.__file__})\nmemory: {MALLOC_SETTINGS[args.malloc]}\n{uptime()}")


def transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "not installed"


def git_revision() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=moekit.__path__[0])
    return result.stdout.strip() or "(no git)"


def uptime() -> str:
    return "uptime:" + subprocess.run(["uptime"], capture_output=True, text=True).stdout.rstrip()


QUICK = dict(hidden=64, expert_ffn=128, layers=2, heads=4, kv_heads=2, vocab=512, batch=2,
             seq=64, reps=2, warmup=1)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8,64", help="numbers of experts, comma-separated")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                        help=f"comma-separated from: {', '.join(COLUMNS)}")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-ffn", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds discarded first")
    parser.add_argument("--malloc", choices=MALLOC_SETTINGS, default="training",
                        help="how freed CPU memory is kept: " + "; ".join(
                            f"{name}: {what}" for name, what in MALLOC_SETTINGS.items()))
    parser.add_argument("--quick", action="store_true",
                        help="a tiny shape and 2 rounds: " + ", ".join(
                            f"{name}={value}" for name, value in QUICK.items()))
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    unknown = sorted(set(args.columns.split(",")) - set(COLUMNS))
    if unknown:
        parser.error(f"unknown columns {unknown}; choose from {', '.join(COLUMNS)}")
    return args


def main():
    args = parse_args()
    # Process-wide, so before the first tensor: the allocator keeps what it is told from here.
    if args.malloc != "glibc":
        retain_freed_cpu_memory(training=args.malloc == "training")
    console = Console(width=160)  # wide enough for the table in a log file too
    console.print(machine_header(args))
    wanted = args.columns.split(",")
    for num_experts in (int(e) for e in args.shapes.split(",")):
        config = model_config(args, num_experts)
        batch = torch.randint(config.vocab_size, (args.batch, args.seq + 1),
                              generator=torch.Generator().manual_seed(0))
        inputs, targets = batch[:, :-1], batch[:, 1:]
        stack = contextlib.ExitStack()
        columns, hf = build_columns(config, wanted, stack, inputs[:1])
        steps = time_interleaved(columns, inputs, targets, args.reps, args.warmup)
        title = (f"E={num_experts} top-{args.top_k} H={args.hidden} F={args.expert_ffn} "
                 f"L={args.layers} GQA {args.heads}/{args.kv_heads} V={args.vocab} "
                 f"batch {args.batch}x{args.seq}, {args.reps} rounds after {args.warmup} warm-up")
        report(console, title, columns, steps, args.batch * args.seq)
        if hf is not None:
            console.print(f"{'HF implementations':{LABEL}s} {hf}")
        if MOEKIT in columns:
            share = grouped_mm_share(columns[MOEKIT], inputs, targets)
            console.print(f"{'expert mm in moekit step':{LABEL}s} {share:.0%}  "
                          "(aten::_grouped_mm in one profiled step)")
        console.print(uptime())
        stack.close()
        del columns


if __name__ == "__main__":
    main()
