"""llama.cpp as a peer: a moekit model exported to Mixtral's layout, converted to GGUF by
llama.cpp's own converter, loaded with ``llama-cpp-python``, decoded greedily from token ids.

Used by ``benchmarks/generate.py`` and by the optional test ``tests/test_engines.py``. Neither
llama-cpp-python nor the converter is a moekit dependency: build them in a separate venv
(docs/inference.md, "The engines people already run"). The converter,
``vendor/llama.cpp/convert_hf_to_gguf.py``, ships in llama-cpp-python's source package only;
``$LLAMA_CPP_CONVERTER`` names it. It needs ``gguf`` (the package in ``vendor/llama.cpp/
gguf-py``), ``sentencepiece``, ``transformers`` and torch in the interpreter that runs it.

The converter wants a tokenizer it recognises; an exported model trained with moekit's
byte-level BPE has none it knows (it identifies BPE pre-tokenizers by a hash of known models),
so ``write_gguf`` adds a small sentencepiece ``tokenizer.model`` to a copy of the export, which
the converter pads to the model's vocabulary. Decoding goes from token ids to token ids, so
the tokenizer never touches what is compared.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONVERTER_VARIABLE = "LLAMA_CPP_CONVERTER"
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16"}


def missing() -> str | None:
    """Why llama.cpp cannot run here (None when it can): a skip or benchmark note."""
    try:
        import llama_cpp  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError as error:
        return f"{error.name} does not import (pip install llama-cpp-python sentencepiece)"
    converter = os.environ.get(CONVERTER_VARIABLE)
    if not converter or not Path(converter).is_file():
        return (f"${CONVERTER_VARIABLE} does not name convert_hf_to_gguf.py (it is in "
                "llama-cpp-python's source package, vendor/llama.cpp/)")
    return None


def _write_sentencepiece(folder: Path) -> None:
    import sentencepiece
    text = folder / "tokenizer-text.txt"
    text.write_text("\n".join(f"token {i} of a small vocabulary for the converter"
                              for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, minloglevel=2)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()


def write_gguf(exported: str | os.PathLike, out_file: str | os.PathLike, dtype: str) -> Path:
    """Convert an exported Mixtral folder to GGUF with llama.cpp's converter, ``dtype`` fp32 or
    bf16; the export is left as it is (its copy gets the tokenizer)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(exported, folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink(missing_ok=True)
        _write_sentencepiece(folder)
        subprocess.run([sys.executable, os.environ[CONVERTER_VARIABLE], str(folder),
                        "--outfile", str(out_file), "--outtype", GGUF_TYPES[dtype]],
                       check=True, capture_output=True, text=True)
    return Path(out_file)


class LlamaCpp:
    """A GGUF model in llama.cpp: ``generate(prompts, new_tokens)`` decodes each prompt alone,
    greedily, from token ids (llama-cpp-python decodes one sequence at a time)."""

    def __init__(self, gguf: str | os.PathLike, threads: int, context: int = 1024):
        from llama_cpp import Llama
        self.model = Llama(str(gguf), n_ctx=context, n_threads=threads,
                           n_threads_batch=threads, n_batch=context, verbose=False)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        outputs = []
        for prompt in prompts:
            self.model.reset()
            tokens = []
            for token in self.model.generate(prompt, top_k=1, temp=0.0, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            outputs.append(tokens)
        return outputs
