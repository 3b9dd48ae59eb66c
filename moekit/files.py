"""Files that are never half-written, the one rule for where a command may write, and reading
files back with errors that name the file.

Every output of moekit (checkpoints, exports, quantized models, run folders) is built in a
temporary folder ``.NAME.tmp-*`` beside its destination, flushed to disk, and renamed into place,
so that a crash or Ctrl-C leaves either the old output or the new one, never a mix; single files
(run.json, metrics.jsonl) go the same way. ``check_output`` is the rule every command that
writes applies before it starts: no output equal to, inside or around one of its inputs; no
existing output replaced without ``overwrite``; none that another process is writing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch


# A tokenizer's files in a model folder (Hugging Face's names; moekit writes the first two).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


# A folder another process claims for writing holds this file, locked (fcntl) and with its pid.
LOCK_FILE = ".moekit.lock"
# What a killed write leaves beside its destination NAME (see atomic_directory).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]+")


class CheckpointError(ValueError):
    """A file or folder that is not what it should be: missing, truncated, of another model."""


class DiskFullError(ValueError):
    """A write ran out of disk space; what it was replacing is left as it was."""


def _relation(path: Path, other: Path) -> str | None:
    """How ``path`` lies relative to ``other`` (both resolved): "is", "is inside", "holds"."""
    if path == other:
        return "is"
    if other in path.parents:
        return "is inside"
    if path in other.parents:
        return "holds"
    return None


def check_output(output: str | os.PathLike, inputs: list[tuple[str, str | os.PathLike]], *,
                 overwrite: bool, option: str = "--out", kind: str = "folder",
                 hint: str = "") -> None:
    """Refuse to write ``output`` (a "folder" or a "file") when it is, lies inside or holds one
    of ``inputs`` ((option, path) pairs), whatever ``overwrite`` says; when another process is
    writing it; when it exists as the other kind; and, without ``overwrite``, when it exists
    and is not empty. ``hint`` is added to the last message (another way to proceed)."""
    path = Path(output).resolve()
    for name, value in inputs:
        relation = _relation(path, Path(value).resolve())
        if relation is not None:
            raise ValueError(f"{option} {output} {relation} the input {name} {value}: writing "
                             f"there would destroy it; choose another {option}")
    if kind == "folder" and path.is_dir():
        refuse_if_being_written(path)
    if path.exists() and path.is_dir() != (kind == "folder"):
        raise ValueError(f"{option} {output} exists and is not a {kind}: expected a {kind} "
                         f"to write; remove it or choose another {option}")
    if not overwrite and path.exists() and (path.is_file() or any(path.iterdir())):
        raise ValueError(f"{option} {output} exists and is not empty: pass --overwrite to "
                         f"replace it{hint}, or choose another {option}")


def refuse_if_being_written(folder: str | os.PathLike) -> None:
    """A ValueError naming the process when another process has claimed ``folder``
    (``lock_folder``)."""
    folder = Path(folder)
    lock = folder / LOCK_FILE
    if not lock.is_file():
        return
    with open(lock) as handle:  # read only: the folder is left exactly as it is
        _claim(handle, folder)


def _claim(handle, folder: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ValueError(f"{folder} is being written by process {handle.read().strip()}: wait "
                         "for it to finish or stop it") from None


def lock_folder(folder: str | os.PathLike):
    """Claim ``folder`` for this process until the returned file is closed (also when the
    process dies, kill -9 included: the kernel drops the lock). A folder another process has
    claimed is a ValueError naming that process."""
    handle = open(Path(folder) / LOCK_FILE, "a+")
    try:
        _claim(handle, folder)
    except ValueError:
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def remove_leftovers(folder: str | os.PathLike, name: str | None = None) -> None:
    """Clear what killed writes left in ``folder`` (of destination ``name`` only, when given):
    ``.NAME.tmp-*`` are removed; ``.NAME.old-*`` too, unless NAME itself is missing (a kill
    between atomic_directory's two renames), when it is the last complete version and is
    renamed back. Call it only on a folder this process has claimed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = _LEFTOVER.fullmatch(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if match["kind"] == "old" and not (folder / match["name"]).exists():
            os.replace(path, folder / match["name"])
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def _disk_full_is_named(destination: Path):
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"no space left on the device while writing {destination}: "
                            "nothing of it was kept and what was there is intact") from None


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
    left exactly as it was; running out of disk space is a DiskFullError saying so.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        with _disk_full_is_named(destination):
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, rename it onto
    ``path``: a reader (or a kill) sees the old file or the new one."""
    path = Path(path)
    with _disk_full_is_named(path):
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


def write_json(path: str | os.PathLike, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


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


def append_to_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                          metadata: dict[str, str] | None = None) -> None:
    """Add ``tensors`` (and ``metadata``) to the safetensors file ``path``, replacing it
    atomically. The file's data is copied through, never held in memory: it may be a model."""
    from safetensors.torch import save
    path = Path(path)
    added_header, added_data = {}, b""
    if tensors:  # serialised by safetensors itself: its dtype names, its byte order
        added = save(tensors)
        added_size = int.from_bytes(added[:8], "little")
        added_header, added_data = json.loads(added[8:8 + added_size]), added[8 + added_size:]
    with open(path, "rb") as source:
        size = int.from_bytes(source.read(8), "little")
        header = json.loads(source.read(size))
        end = max((entry["data_offsets"][1] for name, entry in header.items()
                   if name != "__metadata__"), default=0)
        for name, entry in added_header.items():
            if name != "__metadata__":
                start, stop = entry["data_offsets"]
                header[name] = {**entry, "data_offsets": [end + start, end + stop]}
        header["__metadata__"] = {**header.get("__metadata__", {}), **(metadata or {})}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(partial, "wb") as target:
            target.write(len(encoded).to_bytes(8, "little") + encoded)
            remaining = end
            while remaining:
                chunk = source.read(min(remaining, 64 << 20))
                if not chunk:
                    raise CheckpointError(f"{path}: shorter than its header says")
                target.write(chunk)
                remaining -= len(chunk)
            target.write(added_data)
            target.flush()
            os.fsync(target.fileno())
    os.replace(partial, path)


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
