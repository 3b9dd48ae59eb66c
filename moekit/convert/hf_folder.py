"""Local Hugging Face checkpoint folders: read them into moekit models, write moekit models
into them, without transformers.

A folder holds ``config.json``, the weights (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) and, where present, the tokenizer files, which travel with
the model both ways. Import and export stream (``moekit.convert.streaming``): the weights are
memory-mapped and written tensor by tensor, each stacked expert tensor from its experts'
matrices as they are read, so that neither holds the model in memory nor builds one. Every
output is written atomically; every bad input is a CheckpointError naming the file and the
problem.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from moekit.config import ModelConfig
from moekit.convert.hf import (LAYOUTS, MOEKIT_ONLY, export_weights, from_stacked,
                               hf_config_from_model, model_config_from_hf, stacking_plan)
from moekit.convert.quantized import DequantizedFP8, block_fp8_size
from moekit.convert.streaming import (CheckpointFiles, PendingTensor, total_bytes,
                                      write_safetensors)
from moekit.files import (CheckpointError, atomic_directory, copy_tokenizer_files,
                          read_eos_token, read_json, write_json)
from moekit.model import Transformer
from moekit.model.io import FORMAT as MOEKIT_FORMAT
from moekit.model.io import (describe_mismatch, load_model, read_config, read_model_config,
                             upgrade_state, write_config)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Told the bytes just written and the total to write: a progress bar.
ProgressCallback = Callable[[int, int], None]


def _per_part(progress: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    """The writer's callback (bytes of each part written) for ``progress``."""
    return None if progress is None else (lambda written: progress(written, total))


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a checkpoint folder with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")


def hf_model_config(values: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json``'s values; a config that needs its own
    modeling code (``auto_map``, loaded with trust_remote_code) is refused unless its
    model_type is a family moekit maps."""
    if values.get("auto_map") and values.get("model_type") not in LAYOUTS:
        raise ValueError(f"auto_map={values['auto_map']!r} is not supported: the model needs "
                         f"its own code (trust_remote_code) and its model_type="
                         f"{values.get('model_type')!r} is none of {', '.join(LAYOUTS)}")
    return model_config_from_hf(values)


def read_hf_config(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """The values of a Hugging Face ``config.json`` (``path`` or the one in the folder
    ``path``) and the ModelConfig they map onto."""
    path = Path(path)
    if path.is_dir():
        values = read_json(path / CONFIG_FILE)
        if values.get("format") == MOEKIT_FORMAT:
            raise CheckpointError(f"{path}: already a moekit model folder ({CONFIG_FILE} says "
                                  f"\"format\": \"{MOEKIT_FORMAT}\"); generate, eval, train "
                                  "--init-from and export read it as it is")
        path = path / CONFIG_FILE
    else:
        values = read_json(path)
    try:
        return values, hf_model_config(values)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None


def _weight_files(folder: Path) -> tuple[Path, list[Path], dict[str, str]]:
    """The file that names the weights (the index, or the one file), the files and the index's
    weight map (empty without an index)."""
    index = folder / INDEX_FILE
    if not index.is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (only "
                                  "safetensors weights are read; convert .bin files first)")
        return folder / WEIGHTS_FILE, [folder / WEIGHTS_FILE], {}
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" object")
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            listed = next(name for name, file in weight_map.items() if file == shard)
            raise CheckpointError(f"{folder / shard}: no such file ({INDEX_FILE} lists "
                                  f"{listed} in it)")
    return index, [folder / shard for shard in sorted(set(weight_map.values()))], weight_map


@contextlib.contextmanager
def hf_weights(folder: Path, values: dict):
    """Yield the tensors of a Hugging Face folder (memory-mapped, FP8 dequantized) and the
    file that names them."""
    where, files, weight_map = _weight_files(folder)
    try:
        block = block_fp8_size(values.get("quantization_config"))
    except ValueError as error:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {error}") from None
    with CheckpointFiles.of_files(files) as checkpoint:
        absent = sorted(set(weight_map) - set(checkpoint.files))
        if absent:
            raise CheckpointError(f"{where}: {len(absent)} listed tensors are in no shard, "
                                  f"e.g. {absent[0]} (said to be in {weight_map[absent[0]]})")
        if not checkpoint.files:
            raise CheckpointError(f"{where}: holds no tensors")
        yield (checkpoint if block is None else DequantizedFP8(checkpoint, block)), where


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside, a module's parameters go to the meta device as they are registered (before
    they are initialised), its buffers stay: a model's names, shapes and fresh state without
    its weights' memory. As accelerate's init_empty_weights(include_buffers=False) does."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        if parameter is not None:
            parameter = nn.Parameter(parameter.to("meta"), parameter.requires_grad)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def model_skeleton(config: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
    """The Transformer of ``config`` with its parameters on the meta device (shapes and dtypes
    only) and its buffers (router state) as a new model has them."""
    with _parameters_on_meta():
        model = Transformer(config)
    return model if dtype is None else model.to(dtype)


@dataclass(frozen=True)
class Stacked:
    """A layer's experts stacked, not read yet: per expert its matrices (``stacking_plan``).
    The families' conversions rename stacked experts and transform nothing of them, so this
    stand-in goes through ``from_stacked`` as it is."""
    experts: list[list[str]]

    def parts(self, weights):
        """Its data in order: each expert's matrices in turn."""
        for parts in self.experts:
            for part in parts:
                yield weights.get(part)


def _converted_alone(weights, name: str, source: str, layout: str, values: dict,
                     moekit_name: str):
    """The moekit tensor ``moekit_name`` made of the file tensor ``source`` alone (in
    transformers' naming ``name``): renamed, adapted or split as the family converts it."""
    yield from_stacked({name: weights.get(source)}, layout, values)[moekit_name]


def _stacked_shape(weights, experts: list[list[str]]) -> tuple[int, ...]:
    """[E, rows of one expert's matrices together, ...]; every expert's matrices must have
    expert 0's shapes, and one expert's matrices the same trailing dims."""
    first = [weights.shape(part) for part in experts[0]]
    for parts in experts:
        for part, expected in zip(parts, first):
            shape = weights.shape(part)
            if shape != expected or shape[1:] != first[0][1:]:
                raise CheckpointError(f"{weights.files[part]}: {part} has shape {list(shape)}, "
                                      f"expert 0's {experts[0][0]} {list(first[0])}")
    return (len(experts), sum(shape[0] for shape in first), *first[0][1:])


def _sources(weights, layout: str, values: dict) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """Each moekit tensor the folder's tensors make: its shape, and a function that yields its
    data. A file tensor is converted alone (on the meta device first, for the shapes);
    stacked experts are written from their matrices."""
    sources = {}
    for name, source in stacking_plan(weights.files, layout).items():
        if isinstance(source, str):
            shapes = torch.empty(weights.shape(source), dtype=weights.dtype(source),
                                 device="meta")
            for moekit_name, tensor in from_stacked({name: shapes}, layout, values).items():
                sources[moekit_name] = (tuple(tensor.shape), partial(
                    _converted_alone, weights, name, source, layout, values, moekit_name))
        else:
            stacked = Stacked(source)
            for moekit_name in from_stacked({name: stacked}, layout, values):
                sources[moekit_name] = (_stacked_shape(weights, source),
                                        partial(stacked.parts, weights))
    return sources


def _moekit_tensors(weights, where: Path, values: dict, config: ModelConfig,
                    dtype: torch.dtype | None) -> tuple[Transformer, dict[str, PendingTensor]]:
    """The skeleton of the model and every tensor of its moekit folder, still unread: the
    folder's tensors converted, cast to ``dtype`` (default: the embedding's), and moekit's
    own router state as a new model starts it."""
    try:
        sources = _sources(weights, values["model_type"], values)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    stored = weights.dtype("model.embed_tokens.weight" if "model.embed_tokens.weight"
                           in weights.files else next(iter(weights.files)))
    skeleton = model_skeleton(config, dtype or stored)
    if config.tie_embeddings:
        sources.pop("lm_head.weight", None)
    problem = describe_mismatch(skeleton, {name: shape for name, (shape, _) in sources.items()},
                                may_lack=MOEKIT_ONLY)
    if problem:
        raise CheckpointError(f"{where}: weights do not fit the model of the config: {problem}")
    tensors = {}
    for name, tensor in skeleton.state_dict().items():
        source = sources.get(name)
        tensors[name] = (PendingTensor.of(tensor) if source is None
                         else PendingTensor(tensor.dtype, tuple(tensor.shape), source[1]))
    return skeleton, tensors


def load_hf(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """The model of a local Hugging Face folder of one of ``LAYOUTS``, in eval mode, in the
    weights' dtype unless ``dtype`` is given. Its memory is the model's and one tensor more:
    the model is allocated in its dtype, uninitialised, and filled tensor by tensor."""
    folder = Path(folder)
    _require_folder(folder)
    values, config = read_hf_config(folder)
    with hf_weights(folder, values) as (weights, where):
        skeleton, tensors = _moekit_tensors(weights, where, values, config, dtype)
        model = skeleton.to_empty(device="cpu")
        targets = model.state_dict()  # the model's own tensors (the skeleton's are in tensors)
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor.materialize())
    return model.eval()


@dataclass(frozen=True)
class Imported:
    """What ``import_hf`` wrote."""
    config: ModelConfig
    dtype: torch.dtype
    parameters: int


def import_hf(source: str | os.PathLike, destination: str | os.PathLike,
              dtype: torch.dtype | None = None, progress: ProgressCallback | None = None) -> Imported:
    """Write the model of the Hugging Face folder ``source`` as a moekit folder, with its
    tokenizer and chat template, one tensor at a time (never the whole model in memory); the
    same folder as building the model and ``save_model``, byte for byte."""
    source = Path(source)
    _require_folder(source)
    values, config = read_hf_config(source)
    with hf_weights(source, values) as (weights, where):
        skeleton, tensors = _moekit_tensors(weights, where, values, config, dtype)
        with atomic_directory(destination) as staging:
            write_safetensors(staging / WEIGHTS_FILE, tensors,
                              on_bytes=_per_part(progress, total_bytes(tensors)))
            write_config(skeleton, staging, extra={"imported_from": str(source)})
            copy_tokenizer_files(source, staging)
    return Imported(config, skeleton.embed_tokens.weight.dtype,
                    sum(p.numel() for p in skeleton.parameters()))


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


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                   progress: ProgressCallback | None) -> None:
    """The tensors as transformers writes them: one file, or shards and their index, each
    written tensor by tensor from ``tensors`` as they are (views of a mapped file, say)."""
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    files, total = shard_names(sizes, max_shard_bytes), sum(sizes.values())
    for file in dict.fromkeys(files.values()):
        write_safetensors(folder / file, {name: PendingTensor.of(t) for name, t in tensors.items()
                                          if files[name] == file}, metadata={"format": "pt"},
                          on_bytes=_per_part(progress, total))
    if len(set(files.values())) > 1:
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                         "weight_map": files})


def _write_hf(config: ModelConfig, state: dict[str, torch.Tensor],
              destination: str | os.PathLike, layout: str,
              tokenizer_from: str | os.PathLike | None, max_shard_bytes: int,
              progress: ProgressCallback | None) -> None:
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is not allowed: expected a "
                         "positive number of bytes")
    values = hf_config_from_model(config, layout)
    dtype = str(state["embed_tokens.weight"].dtype).removeprefix("torch.")
    values.update(dtype=dtype, torch_dtype=dtype)  # v5 and v4 names
    eos_id = None if tokenizer_from is None else _eos_token_id(Path(tokenizer_from))
    with atomic_directory(destination) as staging:
        _write_weights(export_weights(state, layout, values), staging, max_shard_bytes,
                       progress)
        if eos_id is not None:
            values["eos_token_id"] = eos_id
            write_json(staging / GENERATION_CONFIG_FILE, {"eos_token_id": eos_id})
        write_json(staging / CONFIG_FILE, values)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, staging)


def export_hf(model: Transformer, destination: str | os.PathLike, layout: str,
              tokenizer_from: str | os.PathLike | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              progress: ProgressCallback | None = None) -> None:
    """Write ``model`` as a Hugging Face folder of ``layout`` that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer files of
    ``tokenizer_from`` (and the end-of-text id in the configs) where given; weights above
    ``max_shard_bytes`` are sharded as transformers shards them. A feature the layout cannot
    hold is a ValueError before anything is written."""
    _write_hf(model.config, model.state_dict(), destination, layout, tokenizer_from,
              max_shard_bytes, progress)


def export_hf_folder(source: str | os.PathLike, destination: str | os.PathLike, layout: str,
                     tokenizer_from: str | os.PathLike | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: ProgressCallback | None = None) -> None:
    """``export_hf`` of the model of the moekit folder ``source``, without loading it: its
    weights are memory-mapped and written tensor by tensor (a format-1 folder's expert
    weights are transposed in memory first)."""
    source = Path(source)
    config = read_config(source)
    if "quantization" in config:
        raise CheckpointError(f"{source}: holds a quantized model; export writes full-precision "
                              "weights: export the folder it was quantized from")
    skeleton = model_skeleton(read_model_config(source))
    with CheckpointFiles.of_files([source / WEIGHTS_FILE]) as weights:
        state = upgrade_state({name: weights.get(name) for name in weights.files}, config)
        problem = describe_mismatch(skeleton, {name: tuple(t.shape) for name, t in state.items()})
        if problem:
            raise CheckpointError(f"{source / WEIGHTS_FILE}: does not fit the model of "
                                  f"{CONFIG_FILE}: {problem}")
        ordered = {name: state[name] for name in skeleton.state_dict()}  # the model's order
        _write_hf(skeleton.config, ordered, destination, layout, tokenizer_from,
                  max_shard_bytes, progress)
