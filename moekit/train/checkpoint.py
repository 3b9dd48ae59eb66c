"""Training checkpoints: everything needed to continue a run exactly, written atomically.

``RUN/checkpoints/step-000100/`` holds the model folder (config.json + model.safetensors, loadable
by ``moekit.model.load_model`` and every other command), ``tokenizer.json``, and the training
state: ``optimizer.safetensors`` (AdamW moments and step counts, by parameter name, and the torch
random-number state) and ``trainer_state.json`` (the step and the optimizer's group settings).
Batches are a function of the step (``data.train_batch``), so nothing else is needed for a
resumed run to repeat, bit for bit, what an uninterrupted run would have done. Only the newest
``keep`` checkpoints are kept.

A process writing a run folder claims it (``claim_run``): a second one is refused, naming the
first, and what a killed write left (``.step-N.tmp-*`` and the like) is cleared on the next start.
"""
from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.files import (CheckpointError, DiskFullError, atomic_directory,
                          copy_tokenizer_files, lock_folder, read_json, read_safetensors,
                          remove_leftovers, write_json)
from moekit.model.io import (FORMAT_VERSION, WEIGHTS_FILE, folder_format_version,
                             upgrade_tensor, write_config, write_model)
from moekit.model.transformer import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import held_part
from moekit.parallel.sharded_checkpoint import load_sharded, save_sharded
from moekit.train.optim import local_updaters, optimizer_parts
from moekit.train.tokenizer import TextTokenizer

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def checkpoint_folders(run: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (unfinished ones are hidden temp dirs)."""
    folder = Path(run) / CHECKPOINTS
    found = [path for path in folder.iterdir() if _STEP_FOLDER.fullmatch(path.name)] \
        if folder.is_dir() else []
    return sorted(found, key=lambda path: int(_STEP_FOLDER.fullmatch(path.name).group(1)))


def latest_checkpoint(run: str | Path) -> Path:
    folders = checkpoint_folders(run)
    if not folders:
        raise CheckpointError(f"{run}: no checkpoint in it (expected {CHECKPOINTS}/step-N/)")
    return folders[-1]


def held_optimizer_state(optimizer) -> dict:
    """parameter -> its state, as this rank holds it: a ZeRO-1 part's partition only, DTensor
    shards (FSDP2's, tensor parallelism's), an expert's of this rank's experts."""
    state = {}
    for updater in local_updaters(optimizer):
        state.update(updater.state)
    return state


def _random_states(mesh: Mesh) -> dict:
    """The CPU random-number state: ``rng.torch`` is rank 0's, which a run on another number
    of ranks continues from; ``rng.torch.rankR`` each rank's, which a run on as many ranks
    continues exactly (ranks draw apart when their micro-batches hold different numbers of
    valid tokens, the jitter's noise, say). Each rank returns its own."""
    state = torch.get_rng_state()
    if mesh.world_size == 1:
        return {"rng.torch": state}
    return {f"rng.torch.rank{mesh.rank}": state,
            **({"rng.torch": state.clone()} if mesh.is_main else {})}


def _optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer,
                       mesh: Mesh) -> dict:
    names = {id(p): name for name, p in model.named_parameters()}
    tensors = _random_states(mesh)
    for parameter, state in held_optimizer_state(optimizer).items():
        for key, value in state.items():
            tensors[f"{names[id(parameter)]}.{key}"] = value.detach().contiguous()
    return tensors


@contextlib.contextmanager
def _staged(destination: Path, mesh: Mesh):
    """The folder every rank writes into: rank 0 stages it (``atomic_directory``) and renames
    it into place once all have written; the others learn its path."""
    with atomic_directory(destination) if mesh.is_main else contextlib.nullcontext() as staging:
        if mesh.world_size > 1:
            path = [str(staging) if mesh.is_main else None]
            torch.distributed.broadcast_object_list(path, src=0)
            staging = Path(path[0])
        yield staging


def checkpoint_folder(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(run: str | Path, step: int, model: Transformer,
                    optimizer: torch.optim.Optimizer, tokenizer: TextTokenizer, extra: dict,
                    keep: int, mesh: Mesh = Mesh(), *, weights: dict | None = None,
                    beside: dict[str, dict[str, torch.Tensor]] | None = None,
                    tokenizer_from: str | Path | None = None) -> Path:
    """Write the state after ``step`` completed optimizer steps; drop all but the newest
    ``keep`` checkpoints. Returns the new folder. On several ranks every rank calls it and
    writes the shards it holds (experts, pipeline stages, DTensor shards, ZeRO-1 partitions)
    into rank 0's staging folder (``save_sharded``: the folder must be on a file system every
    rank reaches); the files hold what one process would write. Post-training
    (``moekit.train.post_train``) may give the model ``weights`` to write instead of the
    model's state, more safetensors files to write ``beside`` them (file name -> tensors, the
    same on every rank: rank 0 writes them), and a folder whose tokenizer files (chat template)
    to copy, ``tokenizer_from``."""
    destination = checkpoint_folder(run, step)
    weights = model.state_dict() if weights is None else weights
    optimizer_tensors = _optimizer_tensors(model, optimizer, mesh)
    try:
        with _staged(destination, mesh) as staging:
            from safetensors.torch import save_file
            if mesh.world_size == 1:
                write_model(model, staging, {**extra, "step": step}, weights)
                save_file(optimizer_tensors, str(staging / OPTIMIZER_FILE))
            else:  # every rank its shards; nothing gathered whole
                save_sharded(staging, {WEIGHTS_FILE: weights, OPTIMIZER_FILE: optimizer_tensors},
                             model, mesh)
                if mesh.is_main:
                    write_config(model, staging, {**extra, "step": step})
            if mesh.is_main:
                tokenizer.save(staging)
                if tokenizer_from is not None:  # the same tokenizer, with its chat template
                    copy_tokenizer_files(tokenizer_from, staging)
                for name, tensors in (beside or {}).items():
                    save_file(tensors, str(staging / name))
                groups = [{key: value for key, value in group.items() if key != "params"}
                          for group in optimizer.param_groups]
                write_json(staging / STATE_FILE, {"step": step, "param_groups": groups})
    except DiskFullError as error:
        kept = checkpoint_folders(run)
        raise DiskFullError(f"{error}; the newest complete checkpoint is "
                            f"{kept[-1] if kept else 'none'}: free space, then continue with "
                            f"moekit train --out {run} --resume") from None
    if not mesh.is_main:
        return destination
    for old in checkpoint_folders(run)[:-keep]:
        shutil.rmtree(old)
    return destination


@contextlib.contextmanager
def claim_run(run: Path, write_new_run: Callable[[Path], None] | None):
    """Hold the run folder ``run`` for this process while the body writes in it. A new run
    (``write_new_run`` given) is built beside ``run`` by ``write_new_run(folder)`` and swapped in
    (replacing an old one only now); an existing one is resumed. Either way, temporary files and
    folders of killed writes are cleared first."""
    if write_new_run is None:
        lock = lock_folder(run)
        remove_leftovers(run.parent, run.name)
    else:
        remove_leftovers(run.parent, run.name)  # before: an old run may come back from .old
        with atomic_directory(run) as staging:
            write_new_run(staging)
            lock = lock_folder(staging)  # the lock file moves in with the folder
    with lock:
        remove_leftovers(run)
        remove_leftovers(run / CHECKPOINTS)
        yield


def restore_optimizer_state(folder: str | Path, model: Transformer,
                            optimizer: torch.optim.Optimizer, mesh: Mesh = Mesh()) -> int:
    """Restore the optimizer and random state of ``folder`` (its weights go in first, with
    ``load_weights``, before any layout shards them); returns its step. A rank that holds part
    of the experts takes its part of their moments: any layout resumes any checkpoint."""
    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    version = folder_format_version(folder)
    # On several ranks each reads only the moments it holds; an older folder is read whole.
    tensors = (load_sharded(folder, OPTIMIZER_FILE, model, mesh)
               if mesh.world_size > 1 and version == FORMAT_VERSION
               else read_safetensors(folder / OPTIMIZER_FILE))
    saved_groups = _saved_groups(optimizer, state.get("param_groups", []))
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update(saved)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, moment = key.rsplit(".", 1)
        moments.setdefault(name, {})[moment] = (value if moment == "step"
                                                else upgrade_tensor(name, value, version))
    held = {id(parameter): {key: value if key == "step" else held_part(value, parameter, mesh)
                            for key, value in moments[name].items()}
            for name, parameter in model.named_parameters() if name in moments}
    for part in optimizer_parts(optimizer):  # their groups hold the saved settings now
        parameters = [p for group in part.param_groups for p in group["params"]]
        if hasattr(part, "consolidate_state_dict"):  # ZeRO-1 takes each rank's share itself
            position = {id(p): index for index, p in enumerate(parameters)}
            part.load_state_dict({
                "state": {i: held[id(p)] for i, p in enumerate(parameters) if id(p) in held},
                "param_groups": [{**group, "params": [position[id(p)] for p in group["params"]]}
                                 for group in part.param_groups]})
        else:
            part.state.update({p: held[id(p)] for p in parameters if id(p) in held})
    per_rank = moments.get("rng.torch", {})
    same_ranks = len(per_rank) == mesh.world_size > 1
    torch.set_rng_state(per_rank[f"rank{mesh.rank}"] if same_ranks
                        else moments["rng"]["torch"])
    return int(state["step"])


def _group_key(group: dict) -> tuple:
    return group.get("role"), group.get("lr_scale"), group.get("weight_decay")


def _saved_groups(optimizer: torch.optim.Optimizer, saved: list[dict]) -> list[dict]:
    """The saved settings of each of the optimizer's groups, found by role, learning-rate
    scale and decay: a pipeline stage holds only some of the groups (rank 0's stage wrote
    its own), and one not saved keeps the settings it was built with, from the same config."""
    by_key = {_group_key(group): group for group in saved}
    return [by_key.get(_group_key(group), {key: value for key, value in group.items()
                                           if key != "params"})
            for group in optimizer.param_groups]


def resolve_checkpoint(path: str | Path) -> Path:
    """A model folder: ``path`` itself, or the newest checkpoint when ``path`` is a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a checkpoint or run folder)")
    if (path / "config.json").is_file():
        return path
    if (path / CHECKPOINTS).is_dir():
        return latest_checkpoint(path)
    raise CheckpointError(f"{path}: not a checkpoint (no config.json) and not a run folder "
                          f"(no {CHECKPOINTS}/)")
