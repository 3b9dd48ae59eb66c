"""Chat conversations as text and as training tokens, by a checkpoint's chat template.

A checkpoint's template is Jinja, as Hugging Face stores it: ``chat_template.jinja`` (where
transformers 5 saves it), else ``tokenizer_config.json``'s "chat_template". Without one, a
conversation is one "role: content" line per message, and a prompt ends with "assistant:".

The training form (``chat_tokens``) marks which tokens are the assistant's: each assistant turn
is what rendering the conversation up to that turn adds to the prompt rendered just before it
(with the generation prompt), so that training and ``render_chat`` (what serve and generation
prompt with) see the same text. The default form ends each assistant turn with the end-of-text
token, so that a model learns to stop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moekit.files import CheckpointError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5
CHAT_CONFIG_FILE = "tokenizer_config.json"  # Hugging Face's older home of "chat_template"
ROLES = ("system", "user", "assistant")


def read_chat_template(folder: str | Path) -> str | None:
    """The Jinja chat template of a checkpoint folder, or None when it has none."""
    jinja = Path(folder) / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text()
        except UnicodeDecodeError:
            raise CheckpointError(f"{jinja}: not UTF-8 text") from None
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


def _render(messages: list[dict], template: str | None, eos_token: str,
            add_generation_prompt: bool) -> str:
    if template is None:
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return lines + ("assistant:" if add_generation_prompt else "")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # Hugging Face templates call it to refuse a conversation
        raise ValueError(message)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=eos_token, bos_token="")
    except Exception as error:  # a template error is the checkpoint's, named as such
        raise ValueError(f"the checkpoint's chat template failed on these messages: "
                         f"{error}") from None


def render_chat(messages: list[dict], template: str | None, eos_token: str) -> str:
    """The prompt for ``messages`` ([{"role", "content"}]): the checkpoint's template (Jinja,
    sandboxed as in Hugging Face) with the generation prompt added, or by default one
    "role: content" line per message followed by "assistant:"."""
    return _render(messages, template, eos_token, add_generation_prompt=True)


@dataclass
class ChatTokens:
    ids: list[int]
    assistant: list[bool]  # per token: whether it is the assistant's (trained on)


def chat_tokens(messages: list[dict], template: str | None, tokenizer) -> ChatTokens:
    """The conversation as token ids, with the assistant's tokens marked (module docstring).
    Raises ValueError when the template does not render the conversation turn by turn."""
    ids: list[int] = []
    assistant: list[bool] = []
    rendered = ""

    def add(text: str, is_assistant: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError("the chat template does not render a conversation as a prefix of "
                             "its continuation, so assistant turns cannot be marked: use a "
                             "template that appends each message")
        piece = tokenizer.backend.encode(text[len(rendered):], add_special_tokens=False).ids
        ids.extend(piece)
        assistant.extend([is_assistant] * len(piece))
        rendered = text

    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            add(render_chat(messages[:index], template, tokenizer.eos_token), False)
        add(_render(messages[:index + 1], template, tokenizer.eos_token, False),
            message["role"] == "assistant")
        if message["role"] == "assistant" and template is None:
            ids.append(tokenizer.eos_id)
            assistant.append(True)
    return ChatTokens(ids, assistant)
