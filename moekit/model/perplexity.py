"""Perplexity of a token stream: exp(sum of next-token NLL over the predicted tokens / their
count), the stream cut into windows of the model's context that are scored independently."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moekit.model.transformer import Transformer


@torch.no_grad()
def next_token_nll(model: Transformer, ids_BS: torch.Tensor, mask_BS: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, int]:
    """(sum of -log p(token | the tokens before it), number of tokens predicted) over a batch;
    a token is predicted when it and the one before it are both real (mask True)."""
    logits_BSV = model(ids_BS, mask=mask_BS).logits[:, :-1]
    logits_BSV = logits_BSV.to(torch.promote_types(logits_BSV.dtype, torch.float32))
    targets_BS = ids_BS[:, 1:]
    nll_BS = F.cross_entropy(logits_BSV.transpose(1, 2), targets_BS, reduction="none")
    if mask_BS is not None:
        predicted_BS = mask_BS[:, 1:] & mask_BS[:, :-1]
        return nll_BS[predicted_BS].sum(), int(predicted_BS.sum())
    return nll_BS.sum(), nll_BS.numel()


def perplexity(model: Transformer, tokens: Sequence[int], window: int | None = None,
               batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``tokens``, in windows of ``window`` tokens (default: the
    model's context); the last, shorter window is right-padded and the padding masked out."""
    window = window or model.config.max_seq_len
    if not isinstance(window, int) or not 2 <= window <= model.config.max_seq_len:
        raise ValueError(f"window={window!r} is not allowed: expected an integer in "
                         f"[2, {model.config.max_seq_len}] (the model context)")
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    was_training = model.training
    model.eval()
    device = model.norm.weight.device
    stream = torch.as_tensor(list(tokens), dtype=torch.long, device=device)
    windows = list(stream.split(window))
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        ids_BS = torch.zeros(len(batch), len(batch[0]), dtype=torch.long, device=device)
        mask_BS = torch.zeros_like(ids_BS, dtype=torch.bool)
        for row, piece in enumerate(batch):
            ids_BS[row, :len(piece)], mask_BS[row, :len(piece)] = piece, True
        nll, predicted = next_token_nll(model, ids_BS, None if mask_BS.all() else mask_BS)
        total, count = total + float(nll), count + predicted
    model.train(was_training)
    return math.exp(total / count)
