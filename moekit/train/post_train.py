"""The post-training loop shared by ``moekit sft`` and ``moekit dpo``: a run folder as
``moekit train`` writes it (run.json, metrics.jsonl, plots/, atomic checkpoints, exact
``--resume``, Ctrl-C), starting from a model folder (``init_from``), with what a stage (SFT,
DPO) computes in each step and evaluation.

A stage has ``name``, ``prepare(tokenizer, template, config) -> config`` (tokenizes its data,
before any model loads; SFT's epochs may set the steps), ``attach(model, init_from, mesh)``
(after the weights are in: DPO's reference), ``step(model, optimizer, step, config, mesh) -> record``
and ``evaluate(model, config, mesh) -> record``.

Checkpoints are model folders like pre-training's, with the chat template of ``init_from``
beside the tokenizer. With LoRA (``moekit.train.lora``) ``model.safetensors`` holds the merged
weights, so that every command reads the folder as a plain model, and ``adapter.safetensors``
the adapters, which ``--resume`` puts back on the base weights of ``init_from``. With an EMA
(``moekit.train.ema``), ``ema.safetensors`` holds the averaged weights, evaluations use them,
and the run ends by writing them as a model folder, ``RUN/ema/``.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moekit.config import DataConfig, ModelConfig, TrainConfig
from moekit.files import (atomic_directory, check_output, copy_tokenizer_files, read_json,
                          read_safetensors, refuse_if_being_written, write_json)
from moekit.model.io import (FORMAT_VERSION, WEIGHTS_FILE, check_weights_fit,
                             folder_format_version, load_weights, read_model_config,
                             save_model, write_model)
from moekit.model.transformer import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import parallelize, whole_tensors
from moekit.plan import training_flops_per_token
from moekit.train import checkpoint as ckpt
from moekit.train import lora
from moekit.train.chat import read_chat_template
from moekit.train.ema import EMA_FILE, WeightAverage
from moekit.train.loop import (METRICS_FILE, RUN_FILE, StepLoop, TrainResult,
                               all_ranks_or_none, read_metrics, run_record, run_steps)
from moekit.train.optim import build_optimizer, extend_schedule, set_learning_rate
from moekit.train.tokenizer import load_tokenizer

SETTINGS_KEY = "post_training"  # in run.json and each checkpoint's config.json
EMA_FOLDER = "ema"


@dataclass(frozen=True)
class PostTrainSettings:
    """What a post-training run starts from and adds; saved in run.json for ``--resume``."""
    stage: str  # "sft" or "dpo"
    init_from: str
    data: str | None = None  # None: the embedded instruction set
    lora: lora.LoRAConfig | None = None
    ema_decay: float | None = None
    model: dict = field(default_factory=dict)  # ModelConfig fields set over init_from's
    options: dict = field(default_factory=dict)  # the stage's own (beta, online, ...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PostTrainSettings":
        values = dict(values)
        if values.get("lora") is not None:
            values["lora"] = lora.LoRAConfig(**values["lora"])
        return cls(**values)


def read_settings(run: str | Path) -> tuple[PostTrainSettings, TrainConfig]:
    """The settings and train config of an existing post-training run folder."""
    record = read_json(Path(run) / RUN_FILE)
    if SETTINGS_KEY not in record:
        raise ValueError(f"{run}: not a post-training run (no {SETTINGS_KEY!r} in {RUN_FILE}); "
                         "moekit train --resume continues pre-training runs")
    return PostTrainSettings.from_dict(record[SETTINGS_KEY]), TrainConfig.from_dict(record["train"])


def model_config_for(settings: PostTrainSettings) -> ModelConfig:
    return ModelConfig.from_dict({**read_model_config(settings.init_from).to_dict(),
                                  **settings.model})


def load_chat_tokenizer(folder: str | Path, config: ModelConfig):
    """The tokenizer and chat template of a model folder, checked against its model."""
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model only {config.vocab_size} embeddings: they do not belong together")
    return tokenizer, read_chat_template(folder)


def _build_model(settings, config, seed, device, run, resume,
                 mesh: Mesh) -> tuple[Transformer, Path | None, dict | None]:
    """The model, the folder ``parallelize`` reads it from in parts (None: loaded whole here)
    and the whole tensors it is given beside the folder. On several ranks a model folder of
    the current format is read as each rank holds it, as ``moekit train`` reads it; with
    LoRA the base weights so, from ``init_from``, and its small tensors given whole
    (``_lora_tensors``)."""
    latest = ckpt.latest_checkpoint(run) if resume else None
    folder = Path(settings.init_from if latest is None or settings.lora else latest)
    if mesh.world_size > 1 and folder_format_version(folder) == FORMAT_VERSION:
        with torch.device("meta"):
            model = Transformer(config).train()
        check_weights_fit(model, folder)
        if settings.lora is None:
            return model, folder, None
        lora.add_adapters(model, settings.lora, seed)  # (on the meta device: nothing drawn)
        return model, folder, _lora_tensors(model, folder, latest, seed)
    model = Transformer(config).to(device).train()
    load_weights(model, folder)
    if settings.lora is not None:
        lora.add_adapters(model, settings.lora, seed)
        if latest is not None:  # the adapters, and the router state that moved in training
            lora.load_adapters(model, read_safetensors(latest / lora.ADAPTER_FILE, device))
            saved = read_safetensors(latest / WEIGHTS_FILE, device)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved:
                        buffer.copy_(saved[name])
    return model, None, None


def _read_tensors(path: Path, names) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the safetensors file ``path`` (those it holds), nothing else
    read."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        held = set(handle.keys())
        return {name: handle.get_tensor(name) for name in names if name in held}


def _lora_tensors(model: Transformer, base: Path, latest: Path | None,
                  seed: int) -> dict[str, torch.Tensor]:
    """What a LoRA model read in parts from its ``base`` folder takes besides, whole (all of
    it small): its adapters, the checkpoint's (``latest``) or new ones; the router state the
    checkpoint's training moved; and each adapted router's base weight, which its
    parametrization holds under another name."""
    adapters = (read_safetensors(latest / lora.ADAPTER_FILE) if latest is not None
                else lora.initial_adapters(model, seed))
    lora.check_adapters(model, adapters)
    given = dict(adapters)
    stored = {name: name.replace("parametrizations.weight.original", "weight")
              for name, _ in model.named_parameters()
              if name.endswith("parametrizations.weight.original")}
    base_tensors = _read_tensors(base / WEIGHTS_FILE, stored.values())
    given.update({name: base_tensors[key] for name, key in stored.items()})
    if latest is not None:
        given.update(_read_tensors(latest / WEIGHTS_FILE,
                                   [name for name, _ in model.named_buffers()]))
    return given


def _checkpoint_files(model, average, mesh: Mesh) -> tuple[dict | None, dict]:
    """The weights a checkpoint's model.safetensors holds (None: the model's own) and the
    files beside them, whole (a collective: every rank calls it)."""
    beside = {}
    weights = None
    if lora.has_adapters(model):
        weights, beside[lora.ADAPTER_FILE] = lora.merged_weights(model), lora.adapter_weights(model)
    if average is not None:  # (gathered whole on every rank: small with LoRA)
        beside[EMA_FILE] = whole_tensors(average.tensors(), model, mesh)
    return weights, beside


def post_train(stage, settings: PostTrainSettings, train_config: TrainConfig, run: str | Path,
               *, resume: bool = False, overwrite: bool = False,
               device: str | torch.device = "cpu", mesh: Mesh = Mesh(),
               show_progress: bool = True, steps: int | None = None,
               on_step=None) -> TrainResult:
    """Post-train ``settings.init_from`` with ``stage`` into the run folder ``run`` (module
    docstring); ``resume``, ``overwrite``, ``steps`` and ``mesh`` as ``moekit.train.train``'s.
    The stage's data has been read and checked already (it fails before any model loads)."""
    run, device = Path(run), torch.device(device)
    with all_ranks_or_none(mesh):
        if resume:
            if mesh.is_main:
                refuse_if_being_written(run)
            if steps is not None:
                train_config = extend_schedule(train_config, steps)
        elif mesh.is_main:
            check_output(run, [("--init-from", settings.init_from)]
                         + ([("--data", settings.data)] if settings.data else []),
                         overwrite=overwrite, hint=" (or --resume to continue it)")
        model_config = model_config_for(settings)
        if train_config.seq_len > model_config.max_seq_len:
            raise ValueError(f"seq_len={train_config.seq_len} is longer than the model's "
                             f"context (max_seq_len={model_config.max_seq_len})")
        tokenizer, template = load_chat_tokenizer(settings.init_from, model_config)
        train_config = stage.prepare(tokenizer, template, train_config)
        model, in_parts, given = _build_model(settings, model_config, train_config.seed,
                                              device, run, resume, mesh)
    parallel_model = parallelize(model, mesh, in_parts, device, given=given)
    stage.attach(model, settings.init_from, mesh)  # (DPO: its reference laid out as the model)
    # Training's random draws (dropout) start from the seed however the weights came to be:
    # read whole (a model built first draws its own), or in parts on a meta model.
    torch.manual_seed(train_config.seed)
    optimizer = build_optimizer(model, train_config, mesh)
    latest = ckpt.latest_checkpoint(run) if resume else None
    step = ckpt.restore_optimizer_state(latest, model, optimizer, mesh) if resume else 0
    average = None
    if settings.ema_decay is not None:
        average = WeightAverage(model, settings.ema_decay)
        if latest is not None:
            average.load(read_safetensors(latest / EMA_FILE), mesh)

    def write_new_run(folder: Path) -> None:
        write_json(folder / RUN_FILE, {**run_record(model_config, train_config, DataConfig()),
                                       "data": None, SETTINGS_KEY: settings.to_dict()})
        tokenizer.save(folder)

    def save(at_step: int) -> Path:
        weights, beside = _checkpoint_files(model, average, mesh)
        return ckpt.save_checkpoint(run, at_step, model, optimizer, tokenizer,
                                    {"train": asdict(train_config),
                                     SETTINGS_KEY: settings.to_dict()},
                                    train_config.keep_checkpoints, mesh, weights=weights,
                                    beside=beside, tokenizer_from=settings.init_from)

    def evaluate(at_step: int) -> dict:
        with average.applied() if average is not None else contextlib.nullcontext():
            return stage.evaluate(model, train_config, mesh)

    def one_step(at: int) -> tuple[dict, int]:
        lr = set_learning_rate(optimizer, at, train_config)
        record = {"kind": "train", "step": at + 1, "lr": lr,
                  **stage.step(parallel_model, optimizer, at, train_config, mesh)}
        if average is not None:
            average.update()
        return record, record["tokens"]

    flops_per_token = training_flops_per_token(model_config, train_config.seq_len).model_flops
    result = run_steps(StepLoop(run, train_config, mesh, step=one_step, evaluate=evaluate,
                                save=save, write_new_run=None if resume else write_new_run,
                                flops_per_token=flops_per_token),
                       step, read_metrics(run / METRICS_FILE, step) if resume else [],
                       show_progress, on_step)
    if average is not None:
        _save_average(model, average, run / EMA_FOLDER, result.checkpoint, mesh)
    return result


def _save_average(model: Transformer, average: WeightAverage, folder: Path,
                  tokenizer_from: Path, mesh: Mesh) -> None:
    """The averaged model (LoRA's merged) as a plain model folder; on several ranks gathered
    whole first (a collective), and written by rank 0."""
    merge = lora.has_adapters(model)
    with average.applied():
        if mesh.world_size == 1:
            save_model(lora.merged_model(model) if merge else model, folder,
                       tokenizer_from=tokenizer_from)
            return
        weights = whole_tensors(lora.merged_weights(model) if merge else model.state_dict(),
                                model, mesh)
    if mesh.is_main:
        with atomic_directory(folder) as staging:
            write_model(model, staging, None, weights)
            copy_tokenizer_files(tokenizer_from, staging)
