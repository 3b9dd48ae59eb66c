"""From tokens to the text a client sees: incremental decoding with stop strings, and chat
prompts.

A piece of text is sent only once it can no longer change: a byte-level tokenizer may end a
step in the middle of a UTF-8 character (decoded as U+FFFD until its last byte comes), and the
end of the text may be the start of a stop string, which must not reach the client.
"""
from __future__ import annotations

import json
from pathlib import Path

from moekit.files import CheckpointError

REPLACEMENT = "\ufffd"
CHAT_CONFIG_FILE = "tokenizer_config.json"  # Hugging Face's home of "chat_template"


class TextStream:
    """One generated sequence: ``add(token)`` returns the text that became final; ``finish``
    says why it ended (None while it runs) and ``close()`` returns what was held back."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.token_ids: list[int] = []
        self.sent = 0  # characters already returned
        self.finish: str | None = None
        self.text = ""

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        if token == self.tokenizer.eos_id:
            self.finish = "stop"
            return self.close()
        self.text = self.tokenizer.decode(self.token_ids)
        # Held-back text covers any stop string's start, so none begins in what was sent.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            self.text, self.finish = self.text[:min(found)], "stop"
            return self.close()
        final = len(self.text.rstrip(REPLACEMENT))
        if self.stop:  # the end may be the start of a stop string: hold it back
            final = min(final, len(self.text) - max(len(s) for s in self.stop) + 1)
        return self._send(final)

    def close(self, reason: str = "length") -> str:
        self.finish = self.finish or reason
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent += len(piece)
        return piece


def read_chat_template(folder: str | Path) -> str | None:
    """The Jinja chat template of a checkpoint (``tokenizer_config.json``'s "chat_template",
    as Hugging Face stores it), or None."""
    path = Path(folder) / CHAT_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a readable tokenizer config ({error})") from None
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a string (one template)")
    return template


def render_chat(messages: list[dict], template: str | None, eos_token: str) -> str:
    """The prompt for ``messages`` ([{"role", "content"}]): the checkpoint's template (Jinja,
    sandboxed as in Hugging Face) with the generation prompt added, or by default one
    "role: content" line per message followed by "assistant:"."""
    if template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # Hugging Face templates call it to refuse a conversation
        raise ValueError(message)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=True, eos_token=eos_token, bos_token="")
    except Exception as error:  # a template error is the checkpoint's, named as such
        raise ValueError(f"the checkpoint's chat template failed on these messages: "
                         f"{error}") from None
