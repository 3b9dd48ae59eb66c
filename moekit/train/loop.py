"""The training loop: one run = a folder with its resolved config, metrics, plots and checkpoints.

    RUN/run.json            resolved model/train/data config, seed, package versions, git revision
    RUN/tokenizer.json      the tokenizer trained on the corpus
    RUN/metrics.jsonl       one line per step ("train") and per validation ("eval")
    RUN/plots/*.png         loss, drop rate per layer, expert-load heatmap
    RUN/checkpoints/step-N/ see checkpoint.py; the newest is a model folder for generate/eval

The loss of a step is defined on its whole batch however it is cut (``train/step.py``,
docs/correctness.md).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit import __version__
from moekit.config import DataConfig, ModelConfig, TrainConfig
from moekit.files import (CheckpointError, atomic_write_text, check_output, read_json,
                           refuse_if_being_written, write_json)
from moekit.model.io import (FORMAT_VERSION, check_weights_fit, folder_format_version,
                             load_weights, read_model_config)
from moekit.model.transformer import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import parallelize, unwrap
from moekit.parallel.pipeline import run_schedule, stage_module
from moekit.plan import training_flops_per_token
from moekit.train import checkpoint as ckpt
from moekit.train.data import (check_length, check_long_documents, eval_batches,
                               long_windows, read_documents, split_tokens, train_batch)
from moekit.train.health import expert_similarities
from moekit.train.optim import (build_optimizer, extend_schedule, implementation_of,
                                set_learning_rate)
from moekit.train.plots import plot_run
from moekit.train.step import autocast, check_batch_split, train_step
from moekit.train.progress import Progress
from moekit.train.tokenizer import load_tokenizer, train_tokenizer

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    run: Path
    step: int  # completed optimizer steps
    train_loss: float
    val_loss: float
    checkpoint: Path


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: torch.Tensor, config: TrainConfig,
                    device: torch.device, mesh: Mesh = Mesh()) -> float:
    """Mean cross-entropy per token over the validation windows (dropless: eval mode); the
    data-parallel ranks share the batches and sum their results. ``model``: the model as
    ``parallelize`` returned it (of a pipeline, this rank's stage)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy, tokens
    batches = list(eval_batches(tokens, config.micro_batch_size, config.seq_len,
                                config.eval_batches))
    stage = stage_module(model)

    def add(logits, targets):
        sums[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   reduction="sum")
        sums[1] += targets.numel()
        return logits.new_zeros(())

    for index, counted in mesh.shared_batches(len(batches)):
        inputs, targets = (t.to(device) for t in batches[index])
        if stage is not None:
            stage.after_layers = lambda hidden, stats: hidden
            stage.loss = add if counted else (lambda logits, targets: logits.new_zeros(()))
            stage.context = lambda: autocast(config.precision, device)
            run_schedule(model, mesh, 1, inputs, targets, None, train=False)
            continue
        with autocast(config.precision, device):
            logits = unwrap(model)(inputs).logits
        if counted:
            add(logits, targets)
    model.train(was_training)
    total, count = mesh.sum_all_(sums.to(mesh.device)).tolist()
    return total / count


def _train_step(model, optimizer, splits, long_starts, step, config, mesh) -> dict:
    lr = set_learning_rate(optimizer, step, config)
    inputs, targets = train_batch(splits.train, step, config.batch_size, config.seq_len,
                                  config.seed, long_starts, config.long_fraction)
    return {"kind": "train", "step": step + 1, "lr": lr,
            **train_step(model, optimizer, inputs, targets, config, mesh)}


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_record(model_config, train_config, data_config) -> dict:
    import tokenizers
    return {"model": model_config.to_dict(), "train": asdict(train_config),
            "data": asdict(data_config), "seed": train_config.seed,
            "versions": {"moekit": __version__, "torch": torch.__version__,
                         "tokenizers": tokenizers.__version__},
            "git_revision": _git_revision()}


def read_run(run: str | Path) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The resolved configs of an existing run folder."""
    record = read_json(Path(run) / RUN_FILE)
    try:
        return (ModelConfig.from_dict(record["model"]), TrainConfig.from_dict(record["train"]),
                DataConfig.from_dict(record["data"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{Path(run) / RUN_FILE}: not a moekit run ({error})") from None


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The metrics a resumed run keeps: those of the steps its checkpoint had completed."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def _open_metrics(run: Path, records: list[dict], train_config: TrainConfig):
    """Save the run's train config (``--steps`` may have extended it) and the records it keeps,
    each atomically and before training goes on (a kill at any moment leaves them whole), then
    open metrics.jsonl to append a line per record."""
    saved = read_json(run / RUN_FILE)
    if saved["train"] != asdict(train_config):
        write_json(run / RUN_FILE, {**saved, "train": asdict(train_config)})
    atomic_write_text(run / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    return open(run / METRICS_FILE, "a")


def _start(run: Path, model_config, train_config, data_config, resume: bool, overwrite: bool,
           init_from: Path | None, steps: int | None, writes: bool,
           model_overrides: dict | None = None):
    """Resolve configs and tokenizer for a new or resumed run. Only the rank that ``writes``
    checks the output folder: the others read while it holds the folder."""
    if resume:
        if writes:
            refuse_if_being_written(run)  # before reading what that process may be rewriting
        model_config, train_config, data_config = read_run(run)
        if steps is not None:
            train_config = extend_schedule(train_config, steps)
        return model_config, train_config, data_config, load_tokenizer(run)
    inputs = [("--corpus", path) for path in data_config.corpus or ()]
    if writes:
        check_output(run, inputs + ([("--init-from", init_from)] if init_from else []),
                     overwrite=overwrite, hint=" (or --resume to continue it)")
    if init_from is not None:
        if model_config is not None:
            raise ValueError("init_from brings its own model: leave the model config out")
        model_config, tokenizer = read_model_config(init_from), load_tokenizer(init_from)
        # A stage continues it: a new RoPE base, and a longer context for a longer seq_len
        # (RoPE has no learned positions); its checkpoints record both in config.json.
        model_config = ModelConfig.from_dict({
            **model_config.to_dict(), **(model_overrides or {}),
            "max_seq_len": max(model_config.max_seq_len, train_config.seq_len)})
    else:
        tokenizer = train_tokenizer(read_documents(data_config.corpus), data_config.vocab_size)
        model_config = replace(model_config, vocab_size=tokenizer.vocab_size)
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len={train_config.seq_len} is longer than the model's "
                         f"context (max_seq_len={model_config.max_seq_len})")
    return model_config, train_config, data_config, tokenizer


def _any_rank(flag: bool, mesh: Mesh) -> bool:
    """Whether ``flag`` is set on any rank: all ranks stop at the same step."""
    if mesh.world_size == 1:
        return flag
    return bool(mesh.sum_all_(torch.tensor([int(flag)], device=mesh.device)).item())


@contextlib.contextmanager
def all_ranks_or_none(mesh: Mesh):
    """Every rank goes on, or every rank raises: a rank that finds a bad setting (rank 0 alone
    checks the run folder) must not leave the others waiting in their first collective."""
    try:
        yield
    except Exception:
        _any_rank(True, mesh)
        raise
    if _any_rank(False, mesh):
        raise ValueError(f"rank 0 of {mesh.world_size} refused to start (its message says why)")


class _StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step (so that no checkpoint
    holds a half-applied update); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig,
          run: str | Path, *, resume: bool = False, overwrite: bool = False,
          init_from: str | Path | None = None, device: str | torch.device = "cpu",
          peak_flops: float | None = None, show_progress: bool = True,
          on_step=None, steps: int | None = None, mesh: Mesh = Mesh(),
          model_overrides: dict | None = None) -> TrainResult:
    """Train a model from scratch into the folder ``run``, or continue it (``resume=True``: the
    configs are then those saved in the run, ``steps`` extends it as ``optim.extend_schedule``
    says; ``overwrite=True`` replaces an existing run folder instead, swapped in once the new
    run's settings are known to be good). While it writes, the run folder is claimed for this
    process (``checkpoint.claim_run``). ``init_from``: a model folder (with tokenizer.json)
    whose model, weights and tokenizer the run starts from, e.g. an upcycled checkpoint;
    ``model_config`` is then None, and ``model_overrides`` (e.g. ``{"rope_base": B}``) set
    fields of its config: a long-context stage (with ``train_config.long_fraction``). Each
    step logs its model FLOP/s (from active parameters, moekit.plan), and its MFU when the
    device's ``peak_flops`` is given. ``on_step(record)`` is
    called after each step. Ctrl-C finishes the current step, saves a checkpoint, and raises
    KeyboardInterrupt.

    Under data parallelism (``mesh``, from torchrun) every rank runs this with the same
    arguments and computes its share of each step; rank 0 alone writes and shows progress,
    every figure it logs being of the global batch."""
    run, device = Path(run), torch.device(device)
    init_from = Path(init_from) if init_from is not None else None
    with all_ranks_or_none(mesh):
        model_config, train_config, data_config, tokenizer = _start(
            run, model_config, train_config, data_config, resume, overwrite, init_from, steps,
            writes=mesh.is_main, model_overrides=model_overrides)
        check_batch_split(train_config, mesh.data_size)
        splits = split_tokens(read_documents(data_config.corpus), tokenizer,
                              data_config.val_fraction)
        check_length(splits.train, train_config.seq_len, "training")
        check_length(splits.val, train_config.seq_len, "validation")
        check_long_documents(splits, train_config.seq_len, train_config.long_fraction)

    if train_config.deterministic:
        # cuBLAS needs a fixed workspace for repeatable results (set before its first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(train_config.seed)
    latest = ckpt.latest_checkpoint(run) if resume else init_from
    # On several ranks a folder's weights are read as each rank holds them, and a new run's
    # drawn so (no rank builds the whole model); an older format's folder is read whole and
    # upgraded.
    read_sharded = (latest is not None and mesh.world_size > 1
                    and folder_format_version(latest) == FORMAT_VERSION)
    in_parts = mesh.world_size > 1 and (latest is None or read_sharded)
    with torch.device("meta") if in_parts else contextlib.nullcontext():
        model = Transformer(model_config)
    model = (model if in_parts else model.to(device)).train()
    model.recompute = train_config.recompute
    if latest is not None:
        (check_weights_fit if read_sharded else load_weights)(model, latest)
    parallel_model = parallelize(model, mesh, latest if read_sharded else None, device)
    # Training's random draws (dropout, jitter) start from the seed however the weights came
    # to be: drawn, read whole, or read in parts on a meta model (which draws nothing).
    torch.manual_seed(train_config.seed)
    optimizer = build_optimizer(model, train_config, mesh)
    step = ckpt.restore_optimizer_state(latest, model, optimizer, mesh) if resume else 0

    def write_new_run(folder: Path) -> None:
        write_json(folder / RUN_FILE, {**run_record(model_config, train_config, data_config),
                                       "init_from": None if init_from is None else str(init_from),
                                       "optimizer_impl": implementation_of(optimizer)})
        tokenizer.save(folder)

    records = read_metrics(run / METRICS_FILE, step) if resume else []
    extra = {"train": asdict(train_config), "data": asdict(data_config)}

    def save(at_step: int) -> Path:
        return ckpt.save_checkpoint(run, at_step, model, optimizer, tokenizer, extra,
                                    train_config.keep_checkpoints, mesh)

    def evaluate(at_step: int) -> dict:
        val = validation_loss(parallel_model, splits.val, train_config, device, mesh)
        return {"val_loss": val, "val_ppl": math.exp(val)}

    long_starts = long_windows(splits.train_documents, train_config.seq_len)

    def one_step(at: int) -> tuple[dict, int]:
        record = _train_step(parallel_model, optimizer, splits, long_starts, at, train_config,
                             mesh)
        if train_config.similarity_every and (at + 1) % train_config.similarity_every == 0:
            record["expert_similarity"] = expert_similarities(model, mesh)
        return record, train_config.batch_size * train_config.seq_len

    return run_steps(StepLoop(
        run, train_config, mesh, step=one_step, evaluate=evaluate, save=save,
        write_new_run=None if resume else write_new_run,
        flops_per_token=training_flops_per_token(model_config,
                                                 train_config.seq_len).model_flops,
        peak_flops=peak_flops), step, records, show_progress, on_step)


@dataclass
class StepLoop:
    """What the loop over a run folder's steps needs (pre-training's and post-training's):
    ``step(index) -> (record, tokens trained on)``, ``evaluate(step) -> figures``,
    ``save(step) -> checkpoint``, and ``write_new_run(folder)`` for a new run (None resumes)."""
    run: Path
    config: TrainConfig
    mesh: Mesh
    step: Callable[[int], tuple[dict, int]]
    evaluate: Callable[[int], dict]
    save: Callable[[int], Path]
    write_new_run: Callable[[Path], None] | None
    flops_per_token: float
    peak_flops: float | None = None


def run_steps(loop: StepLoop, step: int, records: list[dict], show_progress: bool = True,
              on_step=None) -> TrainResult:
    """Run the steps after ``step`` (records: those kept so far), logging each to
    metrics.jsonl, evaluating every ``eval_every`` and checkpointing every
    ``checkpoint_every`` steps; Ctrl-C finishes the step, saves and raises KeyboardInterrupt."""
    run, config, mesh = loop.run, loop.config, loop.mesh
    checkpoint = None
    with contextlib.ExitStack() as files, _StopOnCtrlC() as stop, \
            Progress(config.steps, step, show_progress and mesh.is_main) as progress:
        if mesh.is_main:
            files.enter_context(ckpt.claim_run(run, loop.write_new_run))
            log = files.enter_context(_open_metrics(run, records, config))
        else:
            log = files.enter_context(open(os.devnull, "w"))
        stopping = False
        while step < config.steps and not stopping:
            started = time.perf_counter()
            record, tokens = loop.step(step)
            step += 1
            record["tokens_per_s"] = tokens / (time.perf_counter() - started)
            record["model_flops_per_s"] = loop.flops_per_token * record["tokens_per_s"]
            if loop.peak_flops:
                record["mfu"] = record["model_flops_per_s"] / loop.peak_flops
            records.append(record)
            log.write(json.dumps(record) + "\n")
            if step % config.eval_every == 0 or step == config.steps:
                records.append({"kind": "eval", "step": step, **loop.evaluate(step)})
                log.write(json.dumps(records[-1]) + "\n")
            log.flush()
            progress.update(step, record, records)
            if on_step is not None:
                on_step(record)
            stopping = _any_rank(stop.requested, mesh)
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                checkpoint = loop.save(step)
    if mesh.is_main:
        plot_run(records, run / "plots")
    if stopping:
        raise KeyboardInterrupt(f"stopped after step {step}; checkpoint saved in {checkpoint}")
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    val_losses = [r["val_loss"] for r in records if r["kind"] == "eval"]
    return TrainResult(run=run, step=step, train_loss=train_losses[-1],
                       val_loss=val_losses[-1], checkpoint=ckpt.checkpoint_folder(run, step))

