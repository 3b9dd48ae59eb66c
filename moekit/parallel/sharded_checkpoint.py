"""Safetensors files written by every rank at once, each its own shards, with
``torch.distributed.checkpoint`` (DCP) and its Hugging Face storage writer: no rank gathers the
model or its optimizer state.

What each rank holds is described to DCP as a part of the whole tensor, so that the files hold
what one process would write, whatever the layout: FSDP2's parameters and moments are DTensors
already; an expert tensor under expert parallelism, this rank's [E / X, ...] block of the
layer's [E, ...], becomes a DTensor sharded on dim 0 over the ``ep`` group (a ``ModuleExperts``
expert's tensors are its own, under its own name); a replicated tensor (DDP's) is written once,
by a rank DCP picks; a ZeRO-1 moment by the rank that updates it.
Each rank writes its shards (``sharded/shard-R-...``), then the first rank consolidates them
into one file per name (DCP's ``enable_consolidation``) and removes the shards.

Two kinds of tensor DCP's consolidation mishandles in torch 2.13, found by writing them: it
raises on integer tensors (``torch.finfo`` of an integer dtype) and writes zeros for 0-dim
ones. Those are all small (step counters, the sigmoid gate's step, each 0-dim moment step,
random-number states), so the first rank gathers them (``gather_object``) and appends them to
the consolidated file (``files.append_to_safetensors``, which streams the rest).

``load_sharded`` reads such a file back the other way, with DCP's Hugging Face storage reader:
each rank reads only the parts it holds (its experts' rows, its DTensor shards, its stage's
tensors), whatever layout wrote the file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.files import append_to_safetensors
from moekit.parallel.expert_parallel import stacked_expert_names
from moekit.parallel.mesh import Mesh
from moekit.parallel.tensor_parallel import is_sharded

SHARDS_FOLDER = "sharded"  # DCP's name for the per-rank files


def _consolidates(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() > 0


def _as_part_of_whole(name: str, tensor: torch.Tensor, experts: set[str], mesh: Mesh):
    """``tensor`` as DCP must see it: a DTensor when this rank holds a block of ``name``, a
    stacked expert tensor (``experts``)."""
    parameter = name if name in experts else name.rsplit(".", 1)[0]  # a moment's parameter
    if parameter not in experts or mesh.expert_size == 1:
        return tensor
    from torch.distributed.tensor import DTensor, Shard
    if not is_sharded(tensor):
        return DTensor.from_local(tensor, mesh.device_mesh["ep"], [Shard(0)], run_check=False)
    # ZeRO-2/3: FSDP2's shard of this rank's experts over their replicas, a part of its
    # group's block.
    whole = (tensor.shape[0] * mesh.expert_size, *tensor.shape[1:])
    return DTensor.from_local(tensor.to_local(), mesh.expert_shard_mesh, [Shard(0), Shard(0)],
                              run_check=False, shape=whole,
                              stride=torch.empty(whole, device="meta").stride())


def save_sharded(folder: str | Path, files: dict[str, dict[str, torch.Tensor]],
                 model: nn.Module, mesh: Mesh) -> None:
    """Write ``files`` (file name -> this rank's tensors by name) into ``folder``, which every
    rank can reach: each file as one safetensors file holding every tensor whole, as one
    process would write it. A collective: every rank calls it, with the same file names."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    folder, names = Path(folder), sorted(files)
    experts = stacked_expert_names(model)
    mapping = {name: index for index, file in enumerate(names, start=1)
               for name, tensor in files[file].items() if _consolidates(tensor)}
    everyone = [None] * mesh.world_size  # ZeRO-1: a moment's name is known to its rank only
    dist.all_gather_object(everyone, mapping)
    mapping = {name: index for known in everyone for name, index in known.items()}
    if mapping:
        dcp.save({name: _as_part_of_whole(name, tensor, experts, mesh)
                  for file in names for name, tensor in files[file].items()
                  if _consolidates(tensor)},
                 storage_writer=dcp.HuggingFaceStorageWriter(
                     str(folder), fqn_to_index_mapping=mapping, save_distributed=True,
                     enable_consolidation=True))
    small = {file: {name: tensor.cpu() for name, tensor in files[file].items()
                    if not _consolidates(tensor)} for file in names}
    gathered = [None] * mesh.world_size if mesh.is_main else None
    dist.gather_object(small, gathered, dst=0)
    if not mesh.is_main:
        return
    shutil.rmtree(folder / SHARDS_FOLDER, ignore_errors=True)
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)  # one file per name
    count = max(mapping.values(), default=0)
    for index, file in enumerate(names, start=1):
        rest = {name: tensor for of_rank in gathered for name, tensor in of_rank[file].items()}
        consolidated = folder / f"model-{index:05d}-of-{count:05d}.safetensors"
        if consolidated.exists():
            append_to_safetensors(consolidated, rest, {"format": "pt"})
            consolidated.rename(folder / file)
        else:  # nothing of it was for DCP (an optimizer before its first step)
            save_file(rest, str(folder / file), metadata={"format": "pt"})


def _stored_by_dcp(handle, key: str) -> bool:
    """Whether ``save_sharded`` wrote the tensor ``key`` of an open file through DCP."""
    tensor = handle.get_slice(key)
    return len(tensor.get_shape()) > 0 and tensor.get_dtype().startswith(("F", "BF"))


def load_sharded(folder: str | Path, file: str, model: nn.Module, mesh: Mesh) -> dict:
    """The tensors of ``folder / file`` named by ``model``'s parameters and buffers (``NAME``
    or ``NAME.KEY``, an optimizer moment) as this rank holds them, each rank reading only its
    part (DCP's ``HuggingFaceStorageReader``); the small ones (step counts, random states)
    whole. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    parameters = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    experts = stacked_expert_names(model)
    tensors, parts = {}, {}
    with safe_open(str(Path(folder) / file), framework="pt") as handle:
        for key in handle.keys():
            name = key if key in parameters else key.rsplit(".", 1)[0]
            if not _stored_by_dcp(handle, key):  # step counts, random states: small
                tensors[key] = handle.get_tensor(key)
            elif name in parameters:  # (not: another pipeline stage's)
                tensors[key] = torch.empty_like(parameters[name])
                parts[key] = _as_part_of_whole(key, tensors[key], experts, mesh)
    dcp.load(parts, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    return tensors
