"""Safetensors files read and written one tensor at a time, so that converting a checkpoint of
hundreds of GB never holds more than one tensor of it.

Reading: ``CheckpointFiles`` memory-maps the files of a folder with safetensors' ``safe_open``;
a tensor it returns is a view of the mapped file (its pages belong to the page cache, not to
the process's anonymous memory). Writing: ``write_safetensors`` takes ``PendingTensor``s, known
by dtype and shape before their data is read, writes the header first and then each tensor's
bytes as its parts come, each part cast to the tensor's dtype. A stacked expert tensor
[E, 2F, D] is written as its experts' gate and up matrices one after another, so it is never
built. The file is byte for byte what ``safetensors.torch.save_file`` writes for the same
tensors.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.files import CheckpointError

# The dtype names of safetensors headers.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its dtype and shape now, its data when ``parts()`` is called, as
    tensors whose bytes (each cast to ``dtype``) follow one another in the file."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: Callable[[], Iterable[torch.Tensor]]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> PendingTensor:
        return cls(tensor.dtype, tuple(tensor.shape), lambda: (tensor,))

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    def materialize(self) -> torch.Tensor:
        """The tensor itself, in memory."""
        return torch.cat([part.to(self.dtype).reshape(-1) for part in self.parts()]
                         ).view(self.shape)


def total_bytes(tensors: dict[str, PendingTensor]) -> int:
    return sum(tensor.nbytes for tensor in tensors.values())


def _file_order(tensors: dict[str, PendingTensor]) -> list[str]:
    """The order safetensors stores these tensors in (by dtype alignment, then name), asked of
    safetensors itself on one-element stand-ins, so that the bytes match its own files."""
    from safetensors.torch import save
    encoded = save({name: torch.zeros(1, dtype=tensor.dtype) for name, tensor in tensors.items()})
    header = json.loads(encoded[8:8 + int.from_bytes(encoded[:8], "little")])
    return [name for name in header if name != "__metadata__"]


def _header(tensors: dict[str, PendingTensor], order: list[str],
            metadata: dict[str, str] | None) -> bytes:
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in order:
        tensor = tensors[name]
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def write_safetensors(path: str | os.PathLike, tensors: dict[str, PendingTensor],
                      metadata: dict[str, str] | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path``, one part at a time; ``on_bytes``
    is told how many bytes each part added. Not atomic: write into an ``atomic_directory``."""
    order = _file_order(tensors)
    with open(path, "wb") as handle:
        handle.write(_header(tensors, order, metadata))
        for name in order:
            tensor, written = tensors[name], 0
            for part in tensor.parts():
                data = part.detach().to(tensor.dtype).contiguous().reshape(-1).view(torch.uint8)
                handle.write(data.numpy())
                written += data.numel()
                if on_bytes is not None:
                    on_bytes(data.numel())
            if written != tensor.nbytes:  # parts that do not add up would shift every offset
                raise ValueError(f"{name}: its parts hold {written} bytes, its shape "
                                 f"{list(tensor.shape)} needs {tensor.nbytes}")


class CheckpointFiles:
    """The tensors of some safetensors files, by name, memory-mapped: ``files`` maps each name
    to its file. Use as a context manager (the files are closed on leaving)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open = contextlib.ExitStack()
        self._handles = {}

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()

    @classmethod
    def of_files(cls, paths: Iterable[Path]) -> CheckpointFiles:
        """Every tensor of each file of ``paths``."""
        checkpoint = cls({})
        for path in paths:
            checkpoint.files.update(dict.fromkeys(checkpoint._handle(path).keys(), path))
        return checkpoint

    def _handle(self, path: Path):
        from safetensors import SafetensorError, safe_open
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file")
            try:
                self._handles[path] = self._open.enter_context(safe_open(str(path), "pt"))
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path}: not a readable safetensors file "
                                      f"({error})") from None
        return self._handles[path]

    def _slice(self, name: str):
        try:
            return self._handle(self.files[name]).get_slice(name)
        except KeyError:
            raise CheckpointError(f"{self.files.get(name, 'the checkpoint')}: holds no tensor "
                                  f"{name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._slice(name).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.files[name]}: {name} is stored as {stored}; moekit "
                                  f"reads {', '.join(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[stored]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, a view of the mapped file."""
        self._slice(name)  # a missing tensor is named with its file
        return self._handle(self.files[name]).get_tensor(name)
