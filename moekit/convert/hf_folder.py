"""Local Hugging Face checkpoint folders: read them into moekit models, write moekit models
into them, without transformers.

A folder holds ``config.json``, the weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) and, where present, the tokenizer files, which travel with
the model both ways. Every output is written atomically; every bad input is a CheckpointError
naming the file and the problem.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.convert.hf import (export_weights, hf_config_from_model, import_weights,
                               load_converted_state, model_config_from_hf)
from moekit.files import (CheckpointError, atomic_directory, copy_tokenizer_files,
                          read_eos_token, read_json, read_safetensors, write_json)
from moekit.model import Transformer
from moekit.model.io import FORMAT as MOEKIT_FORMAT
from moekit.model.io import load_model, save_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The tokenizer and its chat template, as transformers saves them (v4 and v5).
def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a checkpoint folder with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: ``model.safetensors``, or every shard its index lists."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only "
                                  "safetensors weights are read; convert .bin files first)")
        return read_safetensors(folder / WEIGHTS_FILE)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" object")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_safetensors(folder / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} listed tensors are in no shard, "
                              f"e.g. {absent[0]} (said to be in {weight_map[absent[0]]})")
    return tensors


def load_hf(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """The model of a local Hugging Face folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    HunYuan-MoE-V1, GraniteMoE, Llama, Mistral, Qwen2 layouts), in eval mode, in the weights'
    dtype unless ``dtype`` is given."""
    folder = Path(folder)
    _require_folder(folder)
    values = read_json(folder / CONFIG_FILE)
    if values.get("format") == MOEKIT_FORMAT:
        raise CheckpointError(f"{folder}: already a moekit model folder ({CONFIG_FILE} says "
                              f"\"format\": \"{MOEKIT_FORMAT}\"); generate, eval, train "
                              "--init-from and export read it as it is")
    try:
        config = model_config_from_hf(values)
    except ValueError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from None
    weights = folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else WEIGHTS_FILE)
    file_state = read_hf_weights(folder)
    if not file_state:
        raise CheckpointError(f"{weights}: holds no tensors")
    stored_dtype = file_state.get("model.embed_tokens.weight",
                                  next(iter(file_state.values()))).dtype
    try:
        model = Transformer(config).to(dtype or stored_dtype)
        load_converted_state(model, import_weights(file_state, values["model_type"], values))
    except ValueError as error:
        raise CheckpointError(f"{weights}: {error}") from None
    return model.eval()


def import_hf(source: str | os.PathLike, destination: str | os.PathLike,
              dtype: torch.dtype | None = None) -> Transformer:
    """Write the model of the Hugging Face folder ``source`` as a moekit folder, with its
    tokenizer and chat template; returns the model."""
    model = load_hf(source, dtype)
    save_model(model, destination, extra={"imported_from": str(source)}, tokenizer_from=source)
    return model


def load_moekit_or_hf(folder: str | os.PathLike) -> Transformer:
    """The model of a moekit folder or of a local Hugging Face folder, told apart by their
    ``config.json``."""
    folder = Path(folder)
    _require_folder(folder)
    values = read_json(folder / CONFIG_FILE)
    if values.get("format") == MOEKIT_FORMAT:
        return load_model(folder)
    if "model_type" in values:
        return load_hf(folder)
    raise CheckpointError(f"{folder / CONFIG_FILE}: neither a moekit config (\"format\": "
                          f"\"{MOEKIT_FORMAT}\") nor a Hugging Face one (\"model_type\")")


def _eos_token_id(folder: Path) -> int | None:
    from tokenizers import Tokenizer
    eos = read_eos_token(folder)
    if eos is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(eos)
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{folder / 'tokenizer.json'}: not a readable tokenizer "
                              f"({error})") from None


DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # transformers' default ("50GB"), the Hub's file limit


def shard_names(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, str]:
    """The file of each tensor (name -> bytes, in order): ``model.safetensors`` when all fit
    in one shard, else ``model-0000k-of-0000n.safetensors`` filled in order, a new shard
    when the next tensor would pass ``max_shard_bytes`` (a larger tensor gets one alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    if len(shards) == 1:
        return dict.fromkeys(shards[0], WEIGHTS_FILE)
    return {name: f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            for k, names in enumerate(shards) for name in names}


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """The tensors as transformers writes them: one file, or shards and their index."""
    from safetensors.torch import save_file
    files = shard_names({name: t.numel() * t.element_size() for name, t in tensors.items()},
                        max_shard_bytes)
    for file in dict.fromkeys(files.values()):
        save_file({name: t for name, t in tensors.items() if files[name] == file},
                  str(folder / file), metadata={"format": "pt"})
    if len(set(files.values())) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                         "weight_map": files})


def export_hf(model: Transformer, destination: str | os.PathLike, layout: str,
              tokenizer_from: str | os.PathLike | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write ``model`` as a Hugging Face folder of ``layout`` that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer files of
    ``tokenizer_from`` (and the end-of-text id in the configs) where given; weights above
    ``max_shard_bytes`` are sharded as transformers shards them. A feature the layout cannot
    hold is a ValueError before anything is written."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is not allowed: expected a "
                         "positive number of bytes")
    values = hf_config_from_model(model.config, layout)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    values.update(dtype=dtype, torch_dtype=dtype)  # v5 and v4 names
    eos_id = None if tokenizer_from is None else _eos_token_id(Path(tokenizer_from))
    with atomic_directory(destination) as staging:
        _write_weights(export_weights(model.state_dict(), layout, values), staging,
                       max_shard_bytes)
        if eos_id is not None:
            values["eos_token_id"] = eos_id
            write_json(staging / GENERATION_CONFIG_FILE, {"eos_token_id": eos_id})
        write_json(staging / CONFIG_FILE, values)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, staging)
