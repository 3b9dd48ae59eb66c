"""Experts beyond memory: the routed experts stay in the checkpoint's safetensors file
(memory-mapped by ``safe_open``: page cache the OS may drop, not the process's own memory), and
a cache of the most recently used ones, per expert of each layer, is held in memory within a
byte budget. Everything else (embeddings, attention, norms, routers, shared experts, dense FFNs)
is resident.

The seam is the experts module's contract, ``(x_ND, tokens_per_expert_E) -> y_ND``
(``moekit/moe/experts.py``): ``load_offloaded`` gives every MoE layer an ``OffloadedExperts`` in
place of its experts module, so routing, dispatch and the rest of the layer do not change. Its
forward takes the experts that got rows one at a time, in expert order: the model's one
``ExpertCache`` hands out that expert's tensors (loading a miss from the file), and the
checkpoint's own stacked experts module, plain or quantized and kept on the meta device,
computes them as an experts module of one expert. One expert at a time, because a batch's
prefill may route to more experts than the budget holds.

The cache is a fixed set of slots allocated once (as many whole experts as the budget holds), a
miss copying into the least recently used one: memory never grows past the budget whatever the
traffic, where tensors allocated and freed per miss would leave the allocator's free lists
holding more. Placement, like the serving split (``serving_split.py``), is applied to a plain
model from outside. Legend: N routed rows (grouped by expert), D model dim, E experts.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from moekit.files import CheckpointError
from moekit.model import Transformer
from moekit.model.io import (WEIGHTS_FILE, describe_mismatch, folder_format_version,
                             read_weights, upgrade_tensor)
from moekit.moe import MoELayer, ModuleExperts
from moekit.quant import load_for_inference, model_structure


class ExpertCache:
    """The experts in memory: ``num_slots`` slots, each the tensors of one expert, filled from
    the safetensors file ``path`` and reused least recently used first. ``prefixes``: the
    experts modules (``layers.3.ffn.experts``) it serves, whose tensors (``shapes``: name ->
    stacked shape [E, ...]) the file must hold; each slot takes a tensor's type from the file.
    ``hits``, ``misses`` and ``bytes_loaded`` count what ``expert`` did."""

    def __init__(self, path: str | os.PathLike, prefixes: list[str],
                 shapes: dict[str, torch.Size], budget_bytes: int,
                 device: str | torch.device, format_version: int):
        from safetensors import SafetensorError, safe_open
        self.format_version = format_version
        self._file = safe_open(str(path), framework="pt")  # open (and mapped) while served
        try:
            for prefix in prefixes:
                for name, shape in shapes.items():
                    stored = self._stored_shape(f"{prefix}.{name}")
                    if stored != shape:
                        raise CheckpointError(f"{path}: {prefix}.{name} has shape "
                                              f"{list(stored)}, the model needs {list(shape)}")
            first = {name: self._read(prefixes[0], name, 0) for name in shapes}
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not the experts of its config.json ({error})"
                                  ) from None
        self.expert_bytes = sum(t.numel() * t.element_size() for t in first.values())
        self.num_slots = budget_bytes // self.expert_bytes
        if self.num_slots < 1:
            raise ValueError(f"--expert-memory {budget_bytes:,} bytes holds no expert: one "
                             f"expert takes {self.expert_bytes:,} bytes")
        self.budget_bytes = budget_bytes
        self.slots = {name: torch.empty((self.num_slots, *t.shape[1:]), dtype=t.dtype,
                                        device=device) for name, t in first.items()}
        self._slot_of: OrderedDict[tuple[str, int], int] = OrderedDict()  # oldest use first
        self.hits = self.misses = self.bytes_loaded = 0

    def _stored_shape(self, name: str) -> torch.Size:
        stored = torch.empty(self._file.get_slice(name).get_shape(), device="meta")
        return upgrade_tensor(name, stored, self.format_version).shape

    def _read(self, prefix: str, name: str, expert: int) -> torch.Tensor:
        """One expert's tensor [1, ...] from the file, as this format version holds it."""
        stored = f"{prefix}.{name}"
        one = self._file.get_slice(stored)[expert:expert + 1]
        return upgrade_tensor(stored, one, self.format_version)

    def expert(self, prefix: str, expert: int) -> dict[str, torch.Tensor]:
        """The tensors of ``expert`` of the experts module named ``prefix``, each [1, ...] as a
        stacked experts module of one expert holds them; valid until the next call."""
        key = (prefix, expert)
        slot = self._slot_of.get(key)
        if slot is not None:
            self.hits += 1
            self._slot_of.move_to_end(key)
        else:
            self.misses += 1
            slot = (len(self._slot_of) if len(self._slot_of) < self.num_slots
                    else self._slot_of.popitem(last=False)[1])
            for name, slots in self.slots.items():
                slots[slot:slot + 1].copy_(self._read(prefix, name, expert))
            self.bytes_loaded += self.expert_bytes
            self._slot_of[key] = slot
        return {name: slots[slot:slot + 1] for name, slots in self.slots.items()}


class OffloadedExperts(nn.Module):
    """An experts module whose weights come from ``cache``, one expert at a time, computed by
    ``stacked`` (the checkpoint's experts module named ``prefix``, on the meta device)."""

    def __init__(self, stacked: nn.Module, prefix: str, cache: ExpertCache):
        super().__init__()
        self.num_experts, self.prefix, self.cache = stacked.num_experts, prefix, cache
        # Not a submodule: it holds no memory, and neither state_dict nor .to() may see it.
        object.__setattr__(self, "stacked", stacked)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert_E.tolist()
        outputs = []
        for expert, rows_nD in enumerate(x_ND.split(counts)):
            if counts[expert]:
                tensors = self.cache.expert(self.prefix, expert)
                outputs.append(functional_call(self.stacked, tensors,
                                               (rows_nD, tokens_per_expert_E[expert:expert + 1])))
        return torch.cat(outputs) if outputs else torch.empty_like(x_ND)


def expert_cache(model: nn.Module) -> ExpertCache | None:
    """The expert cache of a model loaded by ``load_offloaded``; None for a resident one."""
    return next((m.cache for m in model.modules() if isinstance(m, OffloadedExperts)), None)


def load_offloaded(folder: str | os.PathLike, device: str | torch.device,
                   expert_memory: int) -> Transformer:
    """The model saved in ``folder`` (plain or quantized), in eval mode, its routed experts
    read from the file on demand into a cache of ``expert_memory`` bytes."""
    model = model_structure(folder, "meta")
    layers = [(f"{name}.experts", module) for name, module in model.named_modules()
              if isinstance(module, MoELayer)]
    if not layers:
        raise ValueError(f"{folder}: the model has no MoE layer, so no experts to offload: "
                         "drop --expert-memory")
    shapes = {}
    for prefix, layer in layers:
        if isinstance(layer.experts, ModuleExperts):
            raise ValueError(f"{prefix} is a ModuleExperts: only stacked experts are offloaded")
        shapes[prefix] = {name: t.shape for name, t in layer.experts.state_dict().items()}
    first = shapes[layers[0][0]]
    if any(layer_shapes != first for layer_shapes in shapes.values()):
        raise ValueError(f"{folder}: the MoE layers' experts differ in shape; offloading "
                         "shares one cache of equal slots between them")
    cache = ExpertCache(Path(folder) / WEIGHTS_FILE, list(shapes), first, expert_memory,
                        device, folder_format_version(folder))
    for prefix, layer in layers:
        layer.experts = OffloadedExperts(layer.experts, prefix, cache)
    offloaded = tuple(f"{prefix}." for prefix, _ in layers)
    state = read_weights(folder, device, keep=lambda name: not name.startswith(offloaded))
    problem = describe_mismatch(model, {name: tuple(t.shape) for name, t in state.items()})
    if problem:
        raise CheckpointError(f"{Path(folder) / WEIGHTS_FILE}: does not fit the model of its "
                              f"config.json: {problem}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_for_serving(folder: str | os.PathLike, device: str | torch.device,
                     expert_memory: int | None = None) -> Transformer:
    """The model of ``folder`` (plain or quantized) for generation: resident, or with its
    experts offloaded into a cache of ``expert_memory`` bytes when that is given."""
    if expert_memory is None:
        return load_for_inference(folder, device)
    return load_offloaded(folder, device, expert_memory)
