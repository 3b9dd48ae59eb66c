"""The long-context stage (docs/train.md): `moekit train --init-from DIR --seq-len L --rope-base B
--long-fraction F` continues a model at a longer context, drawing that share of each step's
windows from documents at least L + 1 tokens long."""
import json

import pytest
import torch

from moekit.cli import main
from moekit.config import ModelConfig, MoEConfig
from moekit.model.io import save_model
from moekit.model.transformer import Transformer
from moekit.train.data import long_windows, train_batch
from moekit.train.tokenizer import train_tokenizer


def test_the_long_share_of_a_batch_lies_inside_long_documents():
    documents = [(0, 10), (11, 40), (52, 5), (58, 30)]  # (start, length), end-of-text after each
    tokens = torch.arange(89)
    seq_len = 20
    inputs, targets = train_batch(tokens, 3, 8, seq_len, seed=1,
                                  long_starts=long_windows(documents, seq_len),
                                  long_fraction=0.25)
    before, _ = train_batch(tokens, 3, 8, seq_len, seed=1)
    torch.testing.assert_close(inputs[:6], before[:6])  # the rest is drawn as before
    for window, target in zip(inputs[6:], targets[6:]):
        start, end = int(window[0]), int(target[-1]) + 1  # tokens are their own positions
        assert any(s <= start and end <= s + n for s, n in documents if n > seq_len), start


def _base(folder):
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(
        vocab_size=257, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=64,
        moe=MoEConfig(hidden_size=32, ffn_size=32, num_experts=4, top_k=2))), folder)
    train_tokenizer([], 257).save(folder)
    return folder


def _stage(init_from, out, corpus, *flags):
    return main(["train", "--init-from", str(init_from), "--out", str(out), "--corpus",
                 *map(str, corpus), "--steps", "2", "--batch-size", "4", "--eval-every", "2",
                 "--eval-batches", "1", "--quiet", *flags])


def test_stages_raise_the_rope_base_and_context_and_chain(tmp_path, capsys):
    base = _base(tmp_path / "base")
    # one document of 900 training tokens (a byte each; the last tenth is held out), 40 of 180
    corpus = [tmp_path / f"doc{i}.txt" for i in range(41)]
    for index, path in enumerate(corpus):
        path.write_text("abcdefghij" * (100 if index == 0 else 20))
    assert _stage(base, tmp_path / "s1", corpus, "--seq-len", "128", "--rope-base", "40000",
                  "--long-fraction", "0.25") == 0
    assert _stage(tmp_path / "s1", tmp_path / "s2", corpus, "--seq-len", "256",
                  "--rope-base", "160000", "--long-fraction", "0.25") == 0
    for stage, base_value, context in (("s1", 40000, 128), ("s2", 160000, 256)):
        saved = json.loads((tmp_path / stage / "checkpoints/step-000002/config.json").read_text())
        assert (saved["model"]["rope_base"], saved["model"]["max_seq_len"]) == (base_value,
                                                                                context)
        assert saved["train"]["long_fraction"] == 0.25
    assert _stage(base, tmp_path / "s3", corpus, "--seq-len", "900", "--long-fraction",
                  "0.25") == 2
    assert "long_fraction=0.25 needs documents of at least seq_len + 1 = 901 training " \
        "tokens; the corpus's longest has 900" in capsys.readouterr().err
    assert not (tmp_path / "s3").exists()


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_long_fraction_outside_0_1_is_refused(tmp_path, capsys, value):
    assert main(["train", "--out", str(tmp_path / "run"), "--long-fraction", value]) == 2
    error = capsys.readouterr().err
    assert "long_fraction" in error and value in error and "[0, 1]" in error
