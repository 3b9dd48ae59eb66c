"""Text corpora, their split into training and validation tokens, and batches.

A corpus is a list of documents. The embedded default corpus is Python's reference-manual topics
(shipped with moekit, PSF license beside it: no download). Users' corpora are files or folders of
plain text (``.txt``, ``.md``: one document per file) and JSONL (``.jsonl``: one document per line,
its ``"text"`` field). The last ``val_fraction`` of every document's tokens is held out for
validation, so both splits cover every document. Documents are joined with the end-of-text token.

Batches are a pure function of (seed, step): a resumed run sees exactly the batches it would
have seen, with no sampler state to save.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from moekit.config import DataConfig
from moekit.train.tokenizer import TextTokenizer

DEFAULT_CORPUS = "python-docs-topics.jsonl.gz"
TEXT_SUFFIXES = (".txt", ".md")
CORPUS_SUFFIXES = TEXT_SUFFIXES + (".jsonl",)


def default_documents() -> list[str]:
    """The embedded corpus: Python's documentation topics, one document per topic."""
    data = resources.files("moekit.train").joinpath("corpus", DEFAULT_CORPUS).read_bytes()
    return [json.loads(line)["text"] for line in gzip.decompress(data).decode().splitlines()]


def jsonl_records(path: Path):
    """(line number, value) of each non-empty line of a JSONL file; a line that is not JSON is
    a ValueError naming the file and line."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{number}: expected an object with a "text" string')
        documents.append(record["text"])
    return documents


def _file_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    try:
        return [path.read_text()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_documents(paths: tuple[str, ...] | list[str]) -> list[str]:
    """The non-empty documents of files and folders (folders: every corpus file below them,
    sorted by path); an empty list of paths gives the embedded corpus."""
    if not paths:
        return default_documents()
    documents = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES)
            if not files:
                raise ValueError(f"corpus folder {name!r} has no {', '.join(CORPUS_SUFFIXES)} "
                                 "files")
        elif path.is_file():
            if path.suffix not in CORPUS_SUFFIXES:
                raise ValueError(f"corpus file {name!r} is not allowed: expected "
                                 f"{', '.join(CORPUS_SUFFIXES)}")
            files = [path]
        else:
            raise ValueError(f"corpus path {name!r} does not exist")
        documents += [text for file in files for text in _file_documents(file)]
    documents = [text for text in documents if text.strip()]
    if not documents:
        raise ValueError(f"corpus {', '.join(paths)} is empty: no text in it")
    return documents


@dataclass
class TokenSplits:
    train: torch.Tensor  # 1-D int64 token stream, documents joined by end-of-text
    val: torch.Tensor
    # (start, length) in ``train`` of each document's training tokens (its end-of-text after)
    train_documents: list[tuple[int, int]] = field(default_factory=list)


def split_tokens(documents: list[str], tokenizer: TextTokenizer,
                 val_fraction: float) -> TokenSplits:
    train, val, spans = [], [], []
    for ids in tokenizer.encode_batch(documents):
        held_out = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 else 0
        spans.append((len(train), len(ids) - held_out))
        train += ids[:len(ids) - held_out] + [tokenizer.eos_id]
        val += ids[len(ids) - held_out:] + [tokenizer.eos_id]
    return TokenSplits(torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long),
                       spans)


def long_windows(documents: list[tuple[int, int]], seq_len: int) -> torch.Tensor:
    """Every start of a window of seq_len + 1 tokens inside one document: the long-context
    stage's draws (``train_batch``)."""
    starts = [torch.arange(start, start + length - seq_len) for start, length in documents
              if length > seq_len]
    return torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)


def check_long_documents(splits: TokenSplits, seq_len: int, long_fraction: float) -> None:
    if long_fraction > 0 and len(long_windows(splits.train_documents, seq_len)) == 0:
        longest = max((length for _, length in splits.train_documents), default=0)
        raise ValueError(f"long_fraction={long_fraction} needs documents of at least seq_len + "
                         f"1 = {seq_len + 1} training tokens; the corpus's longest has "
                         f"{longest}: use longer documents or a shorter seq_len")


def check_length(tokens: torch.Tensor, seq_len: int, split: str) -> None:
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"the {split} split has {tokens.numel()} tokens, fewer than seq_len + 1 "
                         f"= {seq_len + 1}: use a larger corpus or a shorter seq_len")


def train_batch(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int,
                seed: int, long_starts: torch.Tensor | None = None,
                long_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [batch_size, seq_len] of training step ``step``: random windows, the
    last round(long_fraction * batch_size) of them drawn uniformly from ``long_starts``
    (``long_windows``: windows inside documents that long)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    long_count = round(long_fraction * batch_size)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size - long_count,),
                           generator=generator)
    if long_count:
        picks = torch.randint(0, len(long_starts), (long_count,), generator=generator)
        starts = torch.cat([starts, long_starts[picks]])
    windows = torch.stack([tokens[start:start + seq_len + 1] for start in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int):
    """Consecutive non-overlapping windows from the start of ``tokens``: the same every time."""
    windows = (tokens.numel() - 1) // seq_len
    count = min(windows, batch_size * max_batches)
    for first in range(0, count, batch_size):
        starts = range(first * seq_len, min(first + batch_size, count) * seq_len, seq_len)
        block = torch.stack([tokens[start:start + seq_len + 1] for start in starts])
        yield block[:, :-1], block[:, 1:]


def describe_corpus(config: DataConfig) -> str:
    return ", ".join(config.corpus) if config.corpus else f"embedded ({DEFAULT_CORPUS})"

