"""Byte-level BPE tokenizers trained locally with Hugging Face ``tokenizers``.

Every byte is in the vocabulary, so any text encodes losslessly; ``vocab_size=257`` gives the
plain byte-level tokenizer (256 bytes + the end-of-text token, no merges). The tokenizer is saved
as ``tokenizer.json`` beside a checkpoint's weights, in the format ``tokenizers`` (and so
transformers' ``PreTrainedTokenizerFast``) reads.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from moekit.files import CheckpointError, read_eos_token, write_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # names the end-of-text token, as transformers
END_OF_TEXT = "<|endoftext|>"
BYTE_VOCAB_SIZE = 257  # 256 bytes + END_OF_TEXT


class TextTokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> text``, ``eos_id``, ``vocab_size``.

    ``eos_token`` is moekit's ``<|endoftext|>`` for the tokenizers it trains; an imported
    tokenizer brings its own (``</s>``, ``<|im_end|>``...) in ``tokenizer_config.json``."""

    def __init__(self, backend, eos_token: str = END_OF_TEXT):
        self.backend = backend
        self.eos_token = eos_token
        self.eos_id = backend.token_to_id(eos_token)
        if self.eos_id is None:
            raise CheckpointError(f"tokenizer has no {eos_token} token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def save(self, folder: str | os.PathLike) -> None:
        self.backend.save(str(Path(folder) / TOKENIZER_FILE))
        write_json(Path(folder) / TOKENIZER_CONFIG_FILE,
                   {"eos_token": self.eos_token, "tokenizer_class": "PreTrainedTokenizerFast"})


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE tokenizer with ``vocab_size`` entries learned from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not isinstance(vocab_size, int) or vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r} is not allowed: expected an integer >= "
                         f"{BYTE_VOCAB_SIZE} (256 bytes + the end-of-text token)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts if vocab_size > BYTE_VOCAB_SIZE else [], trainer)
    return TextTokenizer(backend)


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """The tokenizer saved beside a checkpoint (``folder/tokenizer.json``, and the end-of-text
    token named in ``folder/tokenizer_config.json`` when there is one)."""
    from tokenizers import Tokenizer
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: not a readable tokenizer ({error})") from None
    return TextTokenizer(backend, read_eos_token(folder) or END_OF_TEXT)
