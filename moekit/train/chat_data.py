"""Post-training data files, read and checked before any model loads.

Chat data (``moekit sft --data``): JSONL, one conversation per line,
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` with at least one
assistant message (the tokens trained on). Preference data (``moekit dpo --data``): JSONL,
``{"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}``; a string prompt is one
user message. Every error names the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.train.chat import ROLES
from moekit.train.data import jsonl_records


@dataclass(frozen=True)
class Preference:
    prompt: tuple[dict, ...]  # the conversation before the response
    chosen: str
    rejected: str


def _records(path: str | Path):
    """(line number, object) of every non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    found = False
    try:
        for number, record in jsonl_records(path):
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            found = True
            yield number, record
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not found:
        raise ValueError(f"{path}: no records in it (expected one JSON object per line)")


def _messages(value, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'{where}: "messages" must be a non-empty list')
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise ValueError(f'{where}: each message must be {{"role": one of '
                             f'{", ".join(ROLES)}, "content": a string}}, got {message!r:.80}')
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def read_chat_file(path: str | Path) -> list[tuple[dict, ...]]:
    """The conversations of a chat JSONL file."""
    conversations = []
    for number, record in _records(path):
        where = f"{path}:{number}"
        if "messages" not in record:
            raise ValueError(f'{where}: missing field "messages"')
        messages = _messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message (nothing to train on)")
        conversations.append(messages)
    return conversations


def read_preference_file(path: str | Path) -> list[Preference]:
    """The preference pairs of a JSONL file."""
    pairs = []
    for number, record in _records(path):
        where = f"{path}:{number}"
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
        if missing:
            raise ValueError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(m) for m in missing)}")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = _messages(prompt, where)
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key]:
                raise ValueError(f'{where}: "{key}" must be a non-empty string')
        if record["chosen"] == record["rejected"]:
            raise ValueError(f'{where}: "chosen" equals "rejected" ({record["chosen"]!r:.60}): '
                             "a pair must prefer one response over a different one")
        pairs.append(Preference(messages, record["chosen"], record["rejected"]))
    return pairs
