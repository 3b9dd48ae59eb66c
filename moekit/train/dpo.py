"""Direct preference optimization (Rafailov et al., 2023), offline and online.

For a prompt x with a preferred response y_w and a rejected one y_l, against a frozen reference:
    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x))
                                - (log pi(y_l|x) - log ref(y_l|x))))
log-probabilities summed over the response tokens. The rewards beta * (log pi - log ref) of
both responses, their margin, the preference accuracy (chosen reward > rejected) and the KL of
the policy to the reference (per response token, over the whole vocabulary) are logged. An
optional SFT loss on the chosen responses (``sft_weight``: per chosen token) and the router's
aux losses (formed over the step's pairs as ``lb_scope`` says, ``moekit.train.router_loss``)
are added.

Policy and reference log-probabilities are computed without token dropping (the MoE layers in
evaluation mode, dropout still on), although the policy trains: with a training capacity a
sequence's log-probability would depend on the rest of the batch. The reference is the
starting model (``init_from``, also on ``--resume``), frozen, or with LoRA the same model with
its adapters off.

Online (``online_prompts`` > 0, Hunyuan-Large's mix): each step also samples ``samples``
responses to that many ``prompts`` (conversations before the assistant's turn) from the current
policy (``generate``, seeded by the step), scores them with ``reward(prompt, response) ->
float`` (the prompt: the last user message) and trains on the best and worst one; a
prompt whose samples all score the same gives no pair and is counted (``skipped``).
"""
from __future__ import annotations

import contextlib
import importlib
import random

import torch
import torch.nn.functional as F

from moekit.config import TrainConfig
from moekit.model.io import load_model
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import clip_gradients, finish_gradients, unwrap
from moekit.train import lora
from moekit.train.chat import chat_tokens
from moekit.train.chat_data import Preference
from moekit.train.instructions import Instruction, exact_answer_reward
from moekit.train.sft import ACCURACY_PROMPTS, answer_accuracy, answers
from moekit.train.router_loss import StepRouterLoss, routing_totals
from moekit.train.step import (IGNORE_INDEX, _LayerStep, _step_figures, autocast,
                               moe_layers)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss, the chosen and the rejected rewards (module docstring)."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def load_reward(name: str):
    """The callable ``module:function`` names (``--reward``)."""
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--reward {name!r} is not allowed: expected module:function, e.g. "
                         "moekit.train.instructions:exact_answer_reward")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward {name!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"--reward {name!r} is not callable")
    return function


@contextlib.contextmanager
def dropless(model: torch.nn.Module):
    """The MoE layers in evaluation mode (no capacity, no jitter) for the body."""
    layers = [(layer, layer.training) for layer in moe_layers(model)]
    for layer, _ in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer, was_training in layers:
            layer.train(was_training)


def pair_rows(pairs: list[Preference], template, tokenizer, seq_len: int):
    """inputs, targets (response tokens only), mask [2P, S]: the chosen responses, then the
    rejected ones; S the longest sequence, at most ``seq_len`` (longer ones are cut)."""
    sequences = []
    for response in ("chosen", "rejected"):
        for pair in pairs:
            messages = [*pair.prompt, {"role": "assistant", "content": getattr(pair, response)}]
            tokens = chat_tokens(messages, template, tokenizer)
            sequences.append((tokens.ids[:-1][:seq_len],
                              [t if a else IGNORE_INDEX for t, a in
                               zip(tokens.ids[1:], tokens.assistant[1:])][:seq_len]))
    width = max(len(inputs) for inputs, _ in sequences)
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, (ids, labels) in enumerate(sequences):
        inputs[row, :len(ids)], targets[row, :len(ids)] = torch.tensor(ids), torch.tensor(labels)
        mask[row, :len(ids)] = True
    return inputs, targets, mask


def _token_logprobs(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    counted = targets_BS != IGNORE_INDEX
    picked = torch.gather(logits_BSV.float().log_softmax(-1), -1,
                          targets_BS.clamp(min=0)[..., None]).squeeze(-1)
    return picked * counted


def _kl_sum(policy_BSV, reference_BSV, counted_BS) -> torch.Tensor:
    """Sum over counted positions of KL(policy || reference) over the vocabulary."""
    log_p, log_q = policy_BSV.float().log_softmax(-1), reference_BSV.float().log_softmax(-1)
    return ((log_p.exp() * (log_p - log_q)).sum(-1) * counted_BS).sum()


class DirectPreference:
    """The ``dpo`` stage of ``post_train``: offline ``pairs`` (and ``held_out`` pairs for
    evaluation), optionally online pairs from ``prompts`` scored by ``reward``."""

    name = "dpo"

    def __init__(self, pairs: list[Preference], held_out: list[Preference], *,
                 beta: float = 0.1, sft_weight: float = 0.0,
                 prompts: list[tuple[dict, ...]] = (), online_prompts: int = 0,
                 samples: int = 4,
                 reward=exact_answer_reward, temperature: float = 1.0,
                 max_new_tokens: int = 16, instructions: list[Instruction] = ()):
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta={beta!r} is not allowed: expected a number > 0")
        if not (isinstance(sft_weight, (int, float)) and sft_weight >= 0):
            raise ValueError(f"sft_weight={sft_weight!r} is not allowed: expected a number >= 0")
        if online_prompts and samples < 2:
            raise ValueError(f"samples={samples} is not allowed online: expected >= 2 responses "
                             "per prompt to rank")
        if online_prompts and not prompts:
            raise ValueError("online DPO needs prompts to sample responses to")
        self.pairs, self.held_out = list(pairs), list(held_out)
        self.beta, self.sft_weight = beta, sft_weight
        self.prompts, self.online_prompts, self.samples = list(prompts), online_prompts, samples
        self.reward, self.temperature, self.max_new_tokens = reward, temperature, max_new_tokens
        self.instructions = list(instructions)[:ACCURACY_PROMPTS]

    def prepare(self, tokenizer, template, config: TrainConfig) -> TrainConfig:
        self.tokenizer, self.template, self.seq_len = tokenizer, template, config.seq_len
        offline = config.batch_size - self.online_prompts
        if offline < 0 or (offline == 0 and not self.online_prompts):
            raise ValueError(f"online_prompts={self.online_prompts} is more than batch_size="
                             f"{config.batch_size} pairs per step")
        self.offline_per_step = offline
        if config.grad_accum != 1:
            raise ValueError("dpo takes grad_accum=1 (its step is one forward of the pairs)")
        return config

    def attach(self, model, base: str) -> None:
        self.reference = None  # with LoRA: the model with its adapters off
        if not lora.has_adapters(model):
            self.reference = load_model(base, next(model.parameters()).device)
            self.reference.requires_grad_(False)

    def _reference_logits(self, model, inputs, mask):
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(inputs, mask).logits
            with lora.adapters_off(model), dropless(model):
                return model(inputs, mask).logits

    def _online_pairs(self, model, step: int, config: TrainConfig) -> tuple[list, int]:
        rng = random.Random(config.seed * 1_000_003 + step)
        chosen = rng.sample(self.prompts, min(self.online_prompts, len(self.prompts)))
        responses = answers(unwrap(model), chosen, self.template, self.tokenizer,
                            self.max_new_tokens, samples=self.samples,
                            temperature=self.temperature, seed=config.seed * 1_000_003 + step)
        pairs, skipped = [], 0
        for messages, texts in zip(chosen, responses):
            question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            scores = [float(self.reward(question, text)) for text in texts]
            best, worst = max(range(len(texts)), key=scores.__getitem__), \
                min(range(len(texts)), key=scores.__getitem__)
            if scores[best] == scores[worst] or not texts[best] or not texts[worst]:
                skipped += 1
                continue
            pairs.append(Preference(messages, texts[best], texts[worst]))
        return pairs, skipped

    def _figures(self, model, pairs, config: TrainConfig, device, mesh: Mesh):
        """The loss and figures of ``pairs`` (with grad when enabled), and this rank's share of
        the router loss (``StepRouterLoss``, over the pairs of all ranks)."""
        inputs, targets, mask = (t.to(device) for t in pair_rows(pairs, self.template,
                                                                 self.tokenizer, self.seq_len))
        layers = moe_layers(model)
        with autocast(config.precision, device), dropless(model):
            totals = None
            if config.lb_scope == "step" and layers:
                totals = routing_totals(unwrap(model), [(inputs, mask)], mesh,
                                        lambda module, batch: module(*batch))
            out = model(inputs, mask)
            reference_logits = self._reference_logits(model, inputs, mask)
        router_share = StepRouterLoss(layers, config.lb_scope, 1, mesh, totals).share(
            out.moe_stats) if layers else out.router_loss.double()
        logprobs = _token_logprobs(out.logits, targets).sum(-1)
        reference = _token_logprobs(reference_logits, targets).sum(-1)
        count = len(pairs)
        losses, chosen, rejected = dpo_loss(logprobs[:count], logprobs[count:],
                                            reference[:count], reference[count:], self.beta)
        counted = targets != IGNORE_INDEX
        chosen_tokens = counted[:count].sum()
        sft = -logprobs[:count].sum()
        return {"dpo_sum": losses.sum(), "sft_sum": sft, "chosen_tokens": chosen_tokens,
                "chosen_reward_sum": chosen.detach().sum(),
                "rejected_reward_sum": rejected.detach().sum(),
                "correct": (chosen > rejected).sum(),
                "kl_sum": _kl_sum(out.logits.detach(), reference_logits, counted),
                "response_tokens": counted.sum(), "router_share": router_share}, out

    def step(self, model, optimizer, step: int, config: TrainConfig, mesh: Mesh) -> dict:
        device = next(model.parameters()).device
        rng = random.Random(config.seed * 1_000_003 + step)
        pairs = [self.pairs[i] for i in rng.sample(range(len(self.pairs)),
                                                   min(self.offline_per_step, len(self.pairs)))]
        skipped = 0
        if self.online_prompts:
            online, skipped = self._online_pairs(model, step, config)
            pairs += online
        mine = pairs[mesh.data_rank::mesh.data_size]  # online pairs may not split evenly
        figures, out = self._figures(model, mine, config, device, mesh)
        # DDP averages the ranks' gradients: each rank's loss is R times its share.
        total = torch.tensor([float(figures["chosen_tokens"]), float(len(mine))], device=device)
        chosen_tokens, pair_count = mesh.sum_(total).tolist()
        loss = (figures["dpo_sum"] / pair_count
                + self.sft_weight * figures["sft_sum"] / max(chosen_tokens, 1)) * mesh.data_size
        (loss + mesh.data_size * figures["router_share"]).backward()
        finish_gradients(model, mesh)
        clip = config.grad_clip if config.grad_clip is not None else float("inf")
        grad_norm = clip_gradients(model, clip, mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layers = moe_layers(unwrap(model))
        layer_figures, sums = _step_figures(
            unwrap(model).config, layers, [_LayerStep.of([s], device) for s in out.moe_stats],
            [figures[k].detach().double() for k in
             ("dpo_sum", "sft_sum", "chosen_reward_sum", "rejected_reward_sum", "correct",
              "kl_sum", "response_tokens", "router_share")], mesh)
        counts = [layer_counts for layer_counts, _, _ in layer_figures]
        for layer, layer_counts in zip(layers, counts):
            layer.update_router_state(layer_counts)
        record = self._record(sums[:7], pair_count, chosen_tokens)
        return {**record, "loss": record["dpo_loss"] + self.sft_weight * record["sft_loss"],
                "router_loss": sums[7], "grad_norm": grad_norm.item(),
                "online_pairs": len(pairs) - min(self.offline_per_step, len(self.pairs)),
                "skipped": skipped, "tokens": int(sums[6]),
                "drop_rate": [c.drop_rate for c in counts],
                "expert_load": [c.expert_load.tolist() for c in counts]}

    @staticmethod
    def _record(sums, pairs: float, chosen_tokens: float) -> dict:
        dpo, sft, chosen, rejected, correct, kl, tokens = sums
        return {"dpo_loss": dpo / pairs, "sft_loss": sft / max(chosen_tokens, 1),
                "chosen_reward": chosen / pairs, "rejected_reward": rejected / pairs,
                "margin": (chosen - rejected) / pairs, "accuracy": correct / pairs,
                "kl": kl / max(tokens, 1)}

    @torch.no_grad()
    def evaluate(self, model, config: TrainConfig, mesh: Mesh) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        pairs = self.held_out[:config.micro_batch_size * config.eval_batches]
        figures, _ = self._figures(model, pairs, config, device, Mesh())  # on each rank
        model.train(was_training)
        keys = ("dpo_sum", "sft_sum", "chosen_reward_sum", "rejected_reward_sum", "correct",
                "kl_sum", "response_tokens")
        record = self._record([float(figures[k]) for k in keys], len(pairs),
                              float(figures["chosen_tokens"]))
        record = {"val_loss": record.pop("dpo_loss"),
                  **{f"val_{key}": value for key, value in record.items()}}
        if self.instructions:
            record["answer_accuracy"] = answer_accuracy(model, self.instructions, self.template,
                                                        self.tokenizer)
        return record
