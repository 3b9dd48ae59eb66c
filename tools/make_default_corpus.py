"""Rebuild moekit's embedded default corpus from this Python's documentation topics.

The corpus is Python's reference-manual topics (``pydoc_data.topics``, the text behind
``help('if')``), written as gzipped JSONL, one topic per line, sorted by name. Shipping a copy
(rather than reading ``pydoc_data`` at run time) keeps training runs identical across Python
versions and distributions that strip ``pydoc_data``. License: PSF (LICENSE-PSF.txt beside it).

    python tools/make_default_corpus.py
"""
import gzip
import json
import sys
from pathlib import Path

from pydoc_data.topics import topics

OUT = Path(__file__).resolve().parents[1] / "moekit" / "train" / "corpus"


def main() -> None:
    lines = [json.dumps({"title": name, "text": topics[name]}, ensure_ascii=False)
             for name in sorted(topics)]
    # mtime=0: the same input gives the same bytes.
    with gzip.GzipFile(OUT / "python-docs-topics.jsonl.gz", "wb", mtime=0) as handle:
        handle.write(("\n".join(lines) + "\n").encode())
    print(f"{len(lines)} topics from Python {sys.version.split()[0]} -> {OUT}")


if __name__ == "__main__":
    main()
