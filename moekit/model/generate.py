"""KV-cache decoding: greedy, temperature, top-k and top-p sampling over batched prompts."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from moekit.model.decode_step import DecodeStep, StaticDecodeCache, cache_length
from moekit.model.transformer import Transformer


def _check_sampling(temperature, top_k, top_p):
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not allowed: expected a number >= 0 "
                         "(0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not allowed: expected an integer >= 1 or None")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is not allowed: expected a number in (0, 1] or None")


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """The next token of each row: argmax when temperature is 0, otherwise a sample from the
    tempered distribution restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits_BV.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits_BV = logits_BV.masked_fill(
            torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -torch.inf)
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_tokens(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
                  temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, eos_id: int | None = None,
                  seed: int | None = None, step: DecodeStep | None = None
                  ) -> Iterator[list[int | None]]:
    """Decode the prompts together and yield, at each step, every prompt's new token (None for
    a prompt that has already emitted eos_id), for up to max_new_tokens steps.

    Prompts of different lengths are left-padded into one batch; padding is masked out of
    attention and routing. The decoding steps run over a fixed-size cache
    (``moekit.model.decode_step``) through ``step`` (default: an eager ``DecodeStep``; pass
    ``DecodeStep(model, compile=True)`` for the compiled one, made once and reused). The
    arguments are checked here, before the first step."""
    _check_sampling(temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is not allowed: expected an "
                         "integer >= 1")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model context ({model.config.max_seq_len})")
    if step is not None and step.model is not model:
        raise ValueError("step was made for another model: DecodeStep(model) of this one")
    return _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                   step or DecodeStep(model))


def prefill(model: Transformer, prompts: list[list[int]], cache_len: int):
    """Run the prompts, left-padded into one batch, through the model in eval mode: the
    logits of each one's last position [B, 1, V] and the KV cache (``cache_len`` positions;
    row b's prompt in its last ``len(prompts[b])`` of the first ``longest`` positions)."""
    device = model.norm.weight.device
    longest = max(len(p) for p in prompts)
    ids_BS = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask_BS = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids_BS[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        mask_BS[row, longest - len(prompt):] = True
    cache = model.new_cache(len(prompts), cache_len)
    logits = model(ids_BS, mask=None if mask_BS.all() else mask_BS, cache=cache,
                   last_only=True).logits
    return logits, cache


@torch.inference_mode()  # lighter than no_grad: no view or version tracking per op
def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, step):
    was_training = model.training
    model.eval()
    try:
        device = model.norm.weight.device
        longest = max(len(p) for p in prompts)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        logits_B1V, cache = prefill(model, prompts, cache_length(longest + max_new_tokens,
                                                                 model.config.max_seq_len))
        logits_BV = logits_B1V[:, -1]
        cache = StaticDecodeCache(cache, torch.tensor([len(p) for p in prompts]))
        finished = [False] * len(prompts)
        for index in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
            tokens = next_B.tolist()
            yield [None if done else token for done, token in zip(finished, tokens)]
            finished = [done or token == eos_id for done, token in zip(finished, tokens)]
            if all(finished) or index == max_new_tokens - 1:
                break
            logits_BV = step(next_B[:, None], cache)
    finally:
        model.train(was_training)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None,
             step: DecodeStep | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens (fewer once it emits eos_id, which
    is kept). Returns the new tokens of each prompt; see ``stream_tokens``."""
    outputs = [[] for _ in prompts]
    for tokens in stream_tokens(model, prompts, max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed, step=step):
        for output, token in zip(outputs, tokens):
            if token is not None:
                output.append(token)
    return outputs
