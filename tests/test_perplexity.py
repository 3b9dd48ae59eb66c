"""Perplexity against a hand value (uniform logits give the vocabulary size) and a naive loop."""
import math
from dataclasses import replace

import pytest
import torch

from moekit.config import preset
from moekit.model import Transformer, perplexity


def _model():
    return Transformer(replace(preset("tiny"), vocab_size=50, max_seq_len=16)).double().eval()


def test_uniform_prediction_gives_the_vocabulary_size():
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: p = 1/50 for every token
    assert perplexity(model, list(range(37)), window=8) == pytest.approx(50.0)


def test_equals_a_naive_loop_over_windows():
    model = _model()
    tokens = torch.randint(0, 50, (37,)).tolist()  # 4 windows of 10, the last one of 7 (padded)
    total, count = 0.0, 0
    for start in range(0, len(tokens), 10):
        window = tokens[start:start + 10]
        logits = model(torch.tensor([window])).logits[0]
        for position in range(1, len(window)):
            row = logits[position - 1].tolist()
            log_normaliser = math.log(sum(math.exp(v) for v in row))
            total += log_normaliser - row[window[position]]
            count += 1
    expected = math.exp(total / count)
    assert perplexity(model, tokens, window=10, batch_size=3) == pytest.approx(expected, rel=1e-9)


def test_bad_window_and_too_few_tokens():
    model = _model()
    with pytest.raises(ValueError, match=r"window=17 is not allowed: expected an integer in "
                                         r"\[2, 16\]"):
        perplexity(model, [1, 2, 3], window=17)
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        perplexity(model, [1])
