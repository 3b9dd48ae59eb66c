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
from moekit.model.io import (FORMAT_VERSION, check_weights_fit, folder_format_version,
                             load_model, read_model_config)
from moekit.model.transformer import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import finish_gradients, parallelize, unwrap
from moekit.train import lora
from moekit.train.chat import chat_tokens
from moekit.train.chat_data import Preference
from moekit.train.instructions import Instruction, exact_answer_reward
from moekit.train.optim import clipped_step
from moekit.train.sft import ACCURACY_PROMPTS, answer_accuracy, answers
from moekit.train.router_loss import StepRouterLoss, routing_totals
from moekit.train.step import (IGNORE_INDEX, LayerStep, autocast, gradients_reduced_if,
                               moe_layers, step_figures)


# The step's summed figures, in the order the step's reduction carries them.
FIGURE_KEYS = ("dpo_sum", "sft_sum", "chosen_reward_sum", "rejected_reward_sum", "correct",
               "kl_sum", "response_tokens")


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


def _summed_logprobs(logits_NV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its counted targets [B], from the logits of those
    positions alone (``logits_mask=targets_BS != IGNORE_INDEX``: [N, V] in row order)."""
    counted_BS = targets_BS != IGNORE_INDEX
    picked_N = logits_NV.float().log_softmax(-1).gather(
        -1, targets_BS[counted_BS][:, None]).squeeze(-1)
    return picked_N.new_zeros(len(targets_BS)).index_add(0, counted_BS.nonzero()[:, 0],
                                                         picked_N)


def _kl_sum(policy_NV, reference_NV) -> torch.Tensor:
    """Sum over the counted positions (the logits' rows) of KL(policy || reference) over the
    vocabulary."""
    log_p, log_q = policy_NV.float().log_softmax(-1), reference_NV.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def reference_model(folder: str, device: torch.device, mesh: Mesh) -> torch.nn.Module:
    """The frozen model of ``folder``, laid out as the policy is on ``mesh`` (its experts
    spread, FSDP2's shards under ZeRO-2/3) and read so, each rank only what it holds: it runs
    forwards on each rank's own pairs, in step with the other ranks. One process, or a folder
    of an older format, loads it whole."""
    if mesh.world_size == 1 or folder_format_version(folder) != FORMAT_VERSION:
        return load_model(folder, device).requires_grad_(False)
    with torch.device("meta"):
        reference = Transformer(read_model_config(folder)).requires_grad_(False)
    check_weights_fit(reference, folder)
    return parallelize(reference, mesh, folder, device, frozen=True).eval()


class DirectPreference:
    """The ``dpo`` stage of ``post_train``: offline ``pairs`` (and ``held_out`` pairs for
    evaluation), optionally online pairs from ``prompts`` scored by ``reward``."""

    name = "dpo"

    def __init__(self, pairs: list[Preference], held_out: list[Preference], *,
                 beta: float = 0.1, sft_weight: float = 0.0,
                 prompts: list[tuple[dict, ...]] = (), online_prompts: int = 0,
                 samples: int = 4,
                 reward=exact_answer_reward, temperature: float = 1.0,
                 max_new_tokens: int = 16, instructions: list[Instruction] = (),
                 precompute_reference: bool = False):
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta={beta!r} is not allowed: expected a number > 0")
        if not (isinstance(sft_weight, (int, float)) and sft_weight >= 0):
            raise ValueError(f"sft_weight={sft_weight!r} is not allowed: expected a number >= 0")
        if online_prompts and samples < 2:
            raise ValueError(f"samples={samples} is not allowed online: expected >= 2 responses "
                             "per prompt to rank")
        if online_prompts and not prompts:
            raise ValueError("online DPO needs prompts to sample responses to")
        if online_prompts and precompute_reference:
            raise ValueError("precompute_reference is not allowed online: the policy's new "
                             "samples need the reference model at every step")
        self.pairs, self.held_out = list(pairs), list(held_out)
        self.beta, self.sft_weight = beta, sft_weight
        self.prompts, self.online_prompts, self.samples = list(prompts), online_prompts, samples
        self.reward, self.temperature, self.max_new_tokens = reward, temperature, max_new_tokens
        self.instructions = list(instructions)[:ACCURACY_PROMPTS]
        self.precompute_reference = precompute_reference

    def prepare(self, tokenizer, template, config: TrainConfig) -> TrainConfig:
        self.tokenizer, self.template, self.seq_len = tokenizer, template, config.seq_len
        offline = config.batch_size - self.online_prompts
        if offline < 0 or (offline == 0 and not self.online_prompts):
            raise ValueError(f"online_prompts={self.online_prompts} is more than batch_size="
                             f"{config.batch_size} pairs per step")
        if offline and offline < config.grad_accum:
            raise ValueError(f"{offline} offline pairs per step cannot fill grad_accum="
                             f"{config.grad_accum} micro-batches: lower online_prompts or "
                             "grad_accum")
        self.offline_per_step = offline
        self.micro_batch_size, self.precision = config.micro_batch_size, config.precision
        return config

    def attach(self, model, base: str, mesh: Mesh) -> None:
        self.reference = None  # with LoRA: the model with its adapters off
        if not lora.has_adapters(model):
            self.reference = reference_model(base, next(model.parameters()).device, mesh)
        # Precomputed: each pair's reference log-probabilities [N, 2] (chosen, rejected).
        self.reference_of_pairs = self.reference_of_held_out = None
        if self.precompute_reference:
            self.reference_of_pairs = self._reference_logprobs(model, self.pairs)
            self.reference_of_held_out = self._reference_logprobs(model, self.held_out)
            self.reference = None  # its memory back before training starts

    @torch.no_grad()
    def _reference_logprobs(self, model, pairs: list[Preference]) -> torch.Tensor:
        device = next(model.parameters()).device
        scores = []
        for first in range(0, len(pairs), self.micro_batch_size):
            batch = pairs[first:first + self.micro_batch_size]
            inputs, targets, mask = (t.to(device) for t in pair_rows(
                batch, self.template, self.tokenizer, self.seq_len))
            with autocast(self.precision, device):
                logits = self._reference_logits(model, inputs, mask, targets != IGNORE_INDEX)
            scores.append(_summed_logprobs(logits, targets).view(2, len(batch)).T)
        return torch.cat(scores).cpu()

    def _reference_logits(self, model, inputs, mask, counted):
        """The reference's logits at the ``counted`` positions."""
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(inputs, mask, logits_mask=counted).logits
            with lora.adapters_off(model), dropless(model):
                return model(inputs, mask, logits_mask=counted).logits

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

    def _rows(self, pairs: list[Preference], device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in pair_rows(pairs, self.template, self.tokenizer,
                                                     self.seq_len))

    def _figures(self, model, pairs, rows, reference, router_loss):
        """The loss sums and figures of ``pairs`` (their ``rows``; with grad when enabled), and
        this rank's share of the router loss (``router_loss``: a ``StepRouterLoss``, or None
        in evaluation). ``reference``: the pairs' precomputed reference log-probabilities
        [P, 2], or None to compute them (and the KL to the reference) here."""
        inputs, targets, mask = rows
        counted = targets != IGNORE_INDEX
        with autocast(self.precision, inputs.device), dropless(model):
            out = model(inputs, mask, logits_mask=counted)
            reference_logits = (self._reference_logits(model, inputs, mask, counted)
                                if reference is None else None)
        router_share = (router_loss.share(out.moe_stats) if router_loss is not None
                        else torch.zeros((), dtype=torch.float64))
        logprobs = _summed_logprobs(out.logits, targets)
        count = len(pairs)
        if reference is None:
            reference = _summed_logprobs(reference_logits, targets).view(2, count).T
        reference = reference.to(logprobs.device)
        losses, chosen, rejected = dpo_loss(logprobs[:count], logprobs[count:],
                                            reference[:, 0], reference[:, 1], self.beta)
        figures = {"dpo_sum": losses.sum(), "sft_sum": -logprobs[:count].sum(),
                   "chosen_reward_sum": chosen.detach().sum(),
                   "rejected_reward_sum": rejected.detach().sum(),
                   "correct": (chosen > rejected).sum(), "response_tokens": counted.sum(),
                   "router_share": router_share}
        if reference_logits is not None:
            figures["kl_sum"] = _kl_sum(out.logits.detach(), reference_logits)
        return figures, out

    def _step_pairs(self, model, step: int, config: TrainConfig) -> tuple[list, list, int]:
        """The step's pairs, the indices of the offline ones (into ``pairs``), and the
        count of online prompts skipped."""
        rng = random.Random(config.seed * 1_000_003 + step)
        chosen = rng.sample(range(len(self.pairs)), min(self.offline_per_step, len(self.pairs)))
        pairs, skipped = [self.pairs[i] for i in chosen], 0
        if self.online_prompts:
            online, skipped = self._online_pairs(model, step, config)
            pairs += online
        return pairs, chosen, skipped

    def step(self, model, optimizer, step: int, config: TrainConfig, mesh: Mesh) -> dict:
        device = next(model.parameters()).device
        pairs, offline, skipped = self._step_pairs(model, step, config)
        # This rank's pairs (online ones may not split evenly), in grad_accum micro-batches.
        mine = list(range(mesh.data_rank, len(pairs), mesh.data_size))
        micro = [mine[m::config.grad_accum] for m in range(config.grad_accum)]
        micro_pairs = [[pairs[i] for i in indices] for indices in micro]
        rows = [self._rows(batch, device) for batch in micro_pairs]
        references = [None if self.reference_of_pairs is None else
                      self.reference_of_pairs[[offline[i] for i in indices]]
                      for indices in micro]
        chosen_here = sum(int((targets[:len(batch)] != IGNORE_INDEX).sum())
                          for batch, (_, targets, _) in zip(micro_pairs, rows))
        total = torch.tensor([float(chosen_here), float(len(mine))], device=device)
        chosen_tokens, pair_count = mesh.sum_(total).tolist()
        layers = moe_layers(model)
        totals = None
        if config.lb_scope == "step" and layers:
            with autocast(config.precision, device), dropless(model):
                totals = routing_totals(unwrap(model), [(inputs, mask) for inputs, _, mask in rows],
                                        mesh, lambda module, batch: module(*batch))
        router_loss = StepRouterLoss(layers, config.lb_scope, config.grad_accum, mesh, totals)
        sums, stats = {}, []
        for index, (batch, batch_rows, reference) in enumerate(zip(micro_pairs, rows,
                                                                   references)):
            with gradients_reduced_if(index == len(rows) - 1, model):
                figures, out = self._figures(model, batch, batch_rows, reference, router_loss)
                # DDP averages the ranks' gradients: each rank's loss is R times its share.
                loss = (figures["dpo_sum"] / pair_count + self.sft_weight * figures["sft_sum"]
                        / max(chosen_tokens, 1) + figures["router_share"]) * mesh.data_size
                loss.backward()
            for key, value in figures.items():
                sums[key] = sums.get(key, 0) + value.detach().double().to(device)
            stats.append(out.moe_stats)
        finish_gradients(model, mesh)
        clip = config.grad_clip if config.grad_clip is not None else float("inf")
        grad_norm = clipped_step(optimizer, model, clip, mesh)
        keys = [key for key in FIGURE_KEYS if key in sums] + ["router_share"]
        layer_figures, summed = step_figures(
            unwrap(model).config, layers, [LayerStep.of(per_layer, device)
                                           for per_layer in zip(*stats)] if layers else [],
            [sums[key] for key in keys], mesh)
        summed = dict(zip(keys, summed))
        counts = [layer_counts for layer_counts, _, _ in layer_figures]
        for layer, layer_counts in zip(layers, counts):
            layer.update_router_state(layer_counts)
        record = self._record(summed, pair_count, chosen_tokens)
        return {**record, "loss": record["dpo_loss"] + self.sft_weight * record["sft_loss"],
                "router_loss": summed["router_share"], "grad_norm": grad_norm.item(),
                "online_pairs": len(pairs) - len(offline),
                "skipped": skipped, "tokens": int(summed["response_tokens"]),
                "drop_rate": [c.drop_rate for c in counts],
                "expert_load": [c.expert_load.tolist() for c in counts]}

    @staticmethod
    def _record(sums: dict, pairs: float, chosen_tokens: float) -> dict:
        record = {"dpo_loss": sums["dpo_sum"] / pairs,
                  "sft_loss": sums["sft_sum"] / max(chosen_tokens, 1),
                  "chosen_reward": sums["chosen_reward_sum"] / pairs,
                  "rejected_reward": sums["rejected_reward_sum"] / pairs,
                  "margin": (sums["chosen_reward_sum"] - sums["rejected_reward_sum"]) / pairs,
                  "accuracy": sums["correct"] / pairs}
        if "kl_sum" in sums:  # not with precomputed reference log-probabilities
            record["kl"] = sums["kl_sum"] / max(sums["response_tokens"], 1)
        return record

    @torch.no_grad()
    def evaluate(self, model, config: TrainConfig, mesh: Mesh) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        count = min(len(self.held_out), config.micro_batch_size * config.eval_batches)
        pairs = self.held_out[:count]
        rows = self._rows(pairs, device)
        reference = (None if self.reference_of_held_out is None
                     else self.reference_of_held_out[:count])
        figures, _ = self._figures(model, pairs, rows, reference, None)  # on each rank
        model.train(was_training)
        chosen_tokens = float((rows[1][:count] != IGNORE_INDEX).sum())
        record = self._record({key: float(value) for key, value in figures.items()},
                              len(pairs), chosen_tokens)
        record = {"val_loss": record.pop("dpo_loss"),
                  **{f"val_{key}": value for key, value in record.items()}}
        if self.instructions:
            record["answer_accuracy"] = answer_accuracy(model, self.instructions, self.template,
                                                        self.tokenizer)
        return record
