"""Save and load a model as a folder: ``config.json`` + ``model.safetensors``.

Each expert of each layer is found by name in the safetensors file (``layers.3.ffn.experts.
gate_up_proj`` holds all experts of layer 3 stacked on dim 0), whatever layout later reads it.
``config.json`` holds ``{"format": "moekit", "format_version": 2, "model": {...}}`` and whatever else the
writer adds (training state, tokenizer name, quantization); readers ignore keys they do not know.

Format versions: 2 stores stacked expert weights as the model holds them, [E, out, in] (and
their quantization scales [E, out, 1]); 1 stored them input-major, [E, in, out] ([E, 1, out]),
and is still read, transposed on loading.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.files import (CheckpointError, atomic_directory, copy_tokenizer_files, read_json,
                          read_safetensors, write_json)
from moekit.model.transformer import Transformer

FORMAT = "moekit"
FORMAT_VERSION = 2  # raised when the folder layout changes; readers refuse newer versions
# Tensors that format_version 1 stored transposed (dims 1 and 2), with their "_scale"s.
_V1_TRANSPOSED = ("experts.gate_up_proj", "experts.up_proj", "experts.down_proj")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_model(model: Transformer, folder: str | os.PathLike, extra: dict | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model's config and weights into an existing folder (no atomicity: see
    ``save_model``, or fill an ``atomic_directory`` with this). ``weights``: the state dict to
    write instead of the model's own (a sharded model's, gathered whole)."""
    from safetensors.torch import save_file
    from safetensors.torch import save_model as save_weights
    folder = Path(folder)
    write_config(model, folder, extra)
    if weights is None:
        save_weights(model, str(folder / WEIGHTS_FILE))  # stores tied embeddings once
    else:
        save_file({name: t.contiguous() for name, t in weights.items()},
                  str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def write_config(model: Transformer, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the model folder's ``config.json`` (its weights are written apart)."""
    write_json(Path(folder) / CONFIG_FILE, {**(extra or {}), "format": FORMAT,
                                            "format_version": FORMAT_VERSION,
                                            "model": model.config.to_dict()})


def save_model(model: Transformer, folder: str | os.PathLike, extra: dict | None = None,
               tokenizer_from: str | os.PathLike | None = None) -> None:
    """Save ``model`` to ``folder``, replacing it atomically, with the tokenizer files (and
    chat template) of the folder ``tokenizer_from`` where it has them."""
    with atomic_directory(folder) as staging:
        write_model(model, staging, extra)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, staging)


def read_config(folder: str | os.PathLike) -> dict:
    """The whole ``config.json`` of a moekit model folder, checked to be one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a moekit checkpoint folder "
                              f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json(folder / CONFIG_FILE)
    if config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: not a moekit model config (expected "
                              f'"format": "{FORMAT}" and a "model" object)')
    if config.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_FILE}: format_version "
                              f"{config['format_version']} was written by a newer moekit (this one "
                              f"reads up to {FORMAT_VERSION}); upgrade moekit")
    return config


def read_model_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(read_config(folder)["model"])
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: bad model config ({error})") from None


def describe_mismatch(model: Transformer, stored: dict[str, tuple[int, ...]],
                      may_lack: tuple[str, ...] = ()) -> str | None:
    """The first difference between the model's tensors and the stored shapes, in words;
    names ending with one of ``may_lack`` may be absent (state a format does not store)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(name for name in set(expected) - set(stored)
                     if not (may_lack and name.endswith(may_lack)))
    if missing and not (model.lm_head is None and missing == ["lm_head.weight"]):
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        return f"{len(unexpected)} tensors the model does not have, e.g. {unexpected[0]}"
    for name, shape in stored.items():
        if shape != expected[name]:
            return f"{name} has shape {list(shape)}, the model needs {list(expected[name])}"
    return None


def upgrade_tensor(name: str, tensor: torch.Tensor, format_version: int) -> torch.Tensor:
    """A tensor named ``name`` in a folder of ``format_version``, as this version holds it."""
    if format_version == 1 and name.removesuffix("_scale").endswith(_V1_TRANSPOSED):
        return tensor.transpose(1, 2).contiguous()
    return tensor


def upgrade_state(tensors: dict, config: dict) -> dict:
    """A format-1 state dict as this version holds it. Format 1 counted recycling forwards
    (``recycle_calls``); its successor ``router_step`` counts optimizer steps, which a
    training checkpoint records."""
    version = config.get("format_version", 1)
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("recycle_calls"):
            name, tensor = (name.removesuffix("recycle_calls") + "router_step",
                            torch.tensor(int(config.get("step", 0))))
        state[name] = upgrade_tensor(name, tensor, version)
    return state


def read_weights(folder: str | os.PathLike, device: str | torch.device = "cpu",
                 keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The tensors of ``folder``'s weights file whose names ``keep`` accepts, as this format
    version holds them; the others are never read (they stay on disk)."""
    from safetensors import SafetensorError, safe_open
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys() if keep(name)}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return upgrade_state(tensors, read_config(folder))


def folder_format_version(folder: str | os.PathLike) -> int:
    return read_config(folder).get("format_version", 1)


def check_weights_fit(model: Transformer, folder: str | os.PathLike) -> None:
    """A CheckpointError unless ``model.safetensors`` of ``folder`` holds every tensor of
    ``model`` (which may be on the meta device) under its name and shape."""
    from safetensors import SafetensorError, safe_open
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = upgrade_state({name: torch.empty(handle.get_slice(name).get_shape(),
                                                       device="meta") for name in handle.keys()},
                                    read_config(folder))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    problem = describe_mismatch(model, {name: tuple(t.shape) for name, t in stored.items()})
    if problem:
        raise CheckpointError(f"{path}: does not fit the model of {CONFIG_FILE}: {problem}")


def load_weights(model: Transformer, folder: str | os.PathLike) -> Transformer:
    """Load ``model.safetensors`` of ``folder`` into ``model``; names and shapes must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_into
    check_weights_fit(model, folder)
    path = Path(folder) / WEIGHTS_FILE
    config = read_config(folder)
    version = config.get("format_version", 1)
    try:
        device = str(next(model.parameters()).device)
        if version == FORMAT_VERSION:
            load_into(model, str(path), strict=True, device=device)
        else:
            tensors = read_safetensors(path, device)
            model.load_state_dict(upgrade_state(tensors, config), strict=True)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return model


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """The model saved in ``folder``, in eval mode."""
    if "quantization" in read_config(folder):
        raise CheckpointError(f"{folder}: holds a quantized model; load it with "
                              "moekit.quant.load_for_inference")
    model = Transformer(read_model_config(folder)).to(device)
    load_weights(model, folder)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
