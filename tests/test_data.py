"""Corpora, splits, batches and the tokenizer, against hand-built expectations."""
import gzip
import json

import pytest
import torch

from moekit.train.data import (default_documents, eval_batches, read_documents, split_tokens,
                               train_batch)
from moekit.train.tokenizer import load_tokenizer, train_tokenizer


def test_embedded_corpus_is_pythons_docs():
    from importlib import resources
    documents = default_documents()
    raw = resources.files("moekit.train").joinpath("corpus", "python-docs-topics.jsonl.gz")
    lines = gzip.decompress(raw.read_bytes()).decode().splitlines()
    assert len(documents) == len(lines) == 79
    assert any('The "if" statement' in text for text in documents)
    assert resources.files("moekit.train").joinpath("corpus", "LICENSE-PSF.txt").is_file()


def test_user_corpus_files_and_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n"
                                         + json.dumps({"text": "fourth", "id": 4}) + "\n")
    assert read_documents([str(tmp_path / "docs"), str(tmp_path / "data.jsonl")]) == [
        "first", "second", "third", "fourth"]


@pytest.mark.parametrize("line, problem", [("{not json", "not valid JSON"),
                                           ('{"txt": "x"}', 'expected an object with a "text"')])
def test_bad_jsonl_names_file_and_line(tmp_path, line, problem):
    (tmp_path / "data.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"data.jsonl:2: {problem}"):
        read_documents([str(tmp_path / "data.jsonl")])


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_documents([str(tmp_path / "nothing")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv' is not allowed: expected .txt, .md, .jsonl"):
        read_documents([str(tmp_path / "a.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt, .md, .jsonl files"):
        read_documents([str(tmp_path / "empty")])


def test_split_holds_out_the_end_of_every_document():
    tokenizer = train_tokenizer([], 257)  # bytes: one token per ASCII character
    splits = split_tokens(["abcdefghij", "klmnopqrst"], tokenizer, 0.2)
    eos = tokenizer.eos_id
    as_ids = [tokenizer.encode(text) for text in ("abcdefgh", "ij", "klmnopqr", "st")]
    assert splits.train.tolist() == as_ids[0] + [eos] + as_ids[2] + [eos]
    assert splits.val.tolist() == as_ids[1] + [eos] + as_ids[3] + [eos]


def test_batches_depend_only_on_seed_and_step():
    tokens = torch.arange(1000)
    inputs, targets = train_batch(tokens, step=7, batch_size=4, seq_len=16, seed=1)
    again, _ = train_batch(tokens, step=7, batch_size=4, seq_len=16, seed=1)
    other, _ = train_batch(tokens, step=8, batch_size=4, seq_len=16, seed=1)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert torch.equal(targets, inputs + 1)  # windows of consecutive tokens, shifted by one
    windows = [x for x, _ in eval_batches(tokens, batch_size=3, seq_len=100, max_batches=10)]
    starts = [row[0].item() for batch in windows for row in batch]
    assert starts == [0, 100, 200, 300, 400, 500, 600, 700, 800]  # (1000 - 1) // 100 windows


def test_tokenizer_round_trip_and_save(tmp_path):
    text = "naïve café — 数据, emoji 🙂 and code: def f(x): return x ** 2\n"
    tokenizer = train_tokenizer(default_documents()[:10], 600)
    assert tokenizer.vocab_size == 600
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("def return")) < len("def return")  # merges were learned
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.eos_id == tokenizer.eos_id
    with pytest.raises(ValueError, match="vocab_size=100 is not allowed"):
        train_tokenizer([], 100)
