"""Quantized checkpoint folders, and loading any moekit checkpoint.

A quantized folder is a moekit model folder whose ``config.json`` also holds ``"quantization":
{"experts": ..., "attention": ..., "embeddings": ..., "dtype": ...}`` (``dtype``: the compute
type of the unquantized tensors) and whose ``model.safetensors`` holds the quantized tensors with
their ``*_scale`` beside them. ``tokenizer.json`` is copied along when the source has one.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.files import TOKENIZER_FILES, CheckpointError, atomic_directory, copy_tokenizer_files
from moekit.model import Transformer, load_model, read_model_config
from moekit.model.io import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config, write_model
from moekit.quant.quantize import PARTS, quantize_model

QUANTIZATION_KEY = "quantization"


def save_quantized(model: Transformer, folder: str | os.PathLike,
                   tokenizer_from: str | os.PathLike | None = None) -> None:
    """Save a quantized model to ``folder`` atomically, with the tokenizer of the folder
    ``tokenizer_from`` when it has one."""
    if getattr(model, "quantization", None) is None:
        raise ValueError("the model is not quantized: call quantize_model first, or save it "
                         "with moekit.model.save_model")
    dtype = str(model.norm.weight.dtype).removeprefix("torch.")
    with atomic_directory(folder) as staging:
        write_model(model, staging, extra={QUANTIZATION_KEY: {**model.quantization,
                                                              "dtype": dtype}})
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, staging)


def quantization_spec(folder: str | os.PathLike) -> dict | None:
    """The quantization of the model in ``folder`` ({part: "fp8" | "int8" | None, "dtype": its
    compute dtype}), or None for an unquantized one."""
    spec = read_config(folder).get(QUANTIZATION_KEY)
    if spec is None:
        return None
    dtype = getattr(torch, str(spec.get("dtype")), None) if isinstance(spec, dict) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: bad {QUANTIZATION_KEY} entry "
                              f"{spec!r}: expected {{{', '.join(PARTS)}, dtype}}")
    return {**{part: spec.get(part) for part in PARTS}, "dtype": dtype}


def load_for_inference(folder: str | os.PathLike,
                       device: str | torch.device = "cpu") -> Transformer:
    """The model saved in ``folder`` (quantized or not), in eval mode."""
    if quantization_spec(folder) is None:
        return load_model(folder, device)
    return load_weights(model_structure(folder).to(device), folder).eval()


def model_structure(folder: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> Transformer:
    """The model of ``folder``'s config, quantized as its weights are, with unloaded weights;
    on the meta device it holds no memory (the weights are then assigned)."""
    spec = quantization_spec(folder)
    with torch.device(device):
        model = Transformer(read_model_config(folder))
    if spec is not None:
        dtype = spec.pop("dtype")
        if dtype != torch.float32:  # built in float32; .to would also cast float64 buffers
            model.to(dtype)
        quantize_model(model, **spec)  # the quantized modules, filled by the caller
    return model


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of a model folder's model: its config, weights and tokenizer files (a
    training checkpoint's optimizer state is not the model's)."""
    names = (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)
    return sum((Path(folder) / name).stat().st_size for name in names
               if (Path(folder) / name).is_file())
