"""Files that are never half-written, and reading them back with errors that name the file.

Every output of moekit (checkpoints, exports, quantized models) is built in a temporary folder
beside its destination, flushed to disk, and renamed into place, so that a crash or Ctrl-C leaves
either the old output or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


# A tokenizer's files in a model folder (Hugging Face's names; moekit writes the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A file or folder that is not what it should be: missing, truncated, of another model."""


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike):
    """Yield a temporary folder to fill; on success it replaces ``destination`` in one rename.

    On an exception (Ctrl-C included) the temporary folder is removed and ``destination`` is
    left exactly as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if destination.exists():
            # Two renames: the old folder is moved aside first, so that at every instant one
            # complete version exists under a known name.
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, value) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a
    CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def read_eos_token(folder: str | os.PathLike) -> str | None:
    """The end-of-sequence token a tokenizer folder names in ``tokenizer_config.json`` (the
    Hugging Face convention), or None when the file or the entry is absent."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    eos = read_json(path).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos  # older files nest it


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy the tokenizer files that ``source`` has into ``destination``."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(destination) / name)
