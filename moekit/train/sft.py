"""Supervised fine-tuning: the loss on the assistant's tokens only, conversations packed.

Each conversation becomes inputs and targets by the chat template (``chat.chat_tokens``); a
target that is not the assistant's is ``IGNORE_INDEX``, so the step's cross-entropy is the mean
over the assistant tokens of the global batch (``train_step``, router aux losses on as in
pre-training). Conversations are packed into rows of ``seq_len`` with document ids: attention
stays within each conversation and positions restart at each (``Transformer.forward``), so a
packed row computes what its conversations would alone. A conversation longer than a row is cut
at ``seq_len`` (counted in the run's log). Rows are visited in epochs, shuffled by (seed, epoch).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moekit.config import TrainConfig
from moekit.model.generate import generate
from moekit.parallel.mesh import Mesh
from moekit.train.chat import chat_tokens, render_chat
from moekit.train.instructions import Instruction, exact_answer_reward
from moekit.train.step import IGNORE_INDEX, train_step

# Hunyuan-Large's SFT (its report): 3 epochs, the learning rate decaying from 2e-5 to 2e-6,
# attention dropout 0.1 and hidden dropout 0.2.
SCHEDULES = {
    "hunyuan": {"train": {"lr": 2e-5, "min_lr_ratio": 0.1, "warmup_steps": 0},
                "epochs": 3, "model": {"attention_dropout": 0.1, "hidden_dropout": 0.2}},
}
ACCURACY_PROMPTS = 64  # held-out instructions answered greedily at each evaluation
ANSWER_TOKENS = 16


@dataclass
class PackedRows:
    """Rows [R, S] of packed conversations: inputs, targets (IGNORE_INDEX where not trained),
    mask of real tokens, and each token's document (conversation) id within its row."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    document_ids: torch.Tensor
    truncated: int  # conversations cut at seq_len

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.inputs[index], self.targets[index], self.mask[index],
                self.document_ids[index])


def pack(conversations, template: str | None, tokenizer, seq_len: int) -> PackedRows:
    """Pack conversations in order, a new row whenever the next one does not fit."""
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used, truncated = 0, 0
    for messages in conversations:
        tokens = chat_tokens(list(messages), template, tokenizer)
        inputs = tokens.ids[:-1]
        targets = [t if trained else IGNORE_INDEX
                   for t, trained in zip(tokens.ids[1:], tokens.assistant[1:])]
        if len(inputs) > seq_len:
            inputs, targets, truncated = inputs[:seq_len], targets[:seq_len], truncated + 1
        if used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets))
        used += len(inputs)
    shape = (len(rows), seq_len)
    packed = PackedRows(torch.zeros(shape, dtype=torch.long),
                        torch.full(shape, IGNORE_INDEX, dtype=torch.long),
                        torch.zeros(shape, dtype=torch.bool),
                        torch.full(shape, -1, dtype=torch.long), truncated)
    for row, documents in enumerate(rows):
        start = 0
        for document, (inputs, targets) in enumerate(documents):
            span = slice(start, start + len(inputs))
            packed.inputs[row, span] = torch.tensor(inputs)
            packed.targets[row, span] = torch.tensor(targets)
            packed.mask[row, span] = True
            packed.document_ids[row, span] = document
            start += len(inputs)
    return packed


def batch_indices(rows: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The rows of step ``step``: epochs over all rows, each in its own seeded order."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (positions // rows).tolist()
    orders = {epoch: torch.randperm(rows, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + epoch)) for epoch in set(epochs)}
    return torch.stack([orders[e][p % rows] for e, p in zip(epochs, positions.tolist())])


@torch.no_grad()
def assistant_loss(model, rows: PackedRows, config: TrainConfig, mesh: Mesh) -> float:
    """Mean cross-entropy per assistant token of ``rows`` (dropless: eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    size = config.micro_batch_size
    firsts = range(0, min(len(rows), size * config.eval_batches), size)
    for index, counted in mesh.shared_batches(len(firsts)):
        first = firsts[index]
        inputs, targets, mask, documents = (t.to(device) for t in
                                            rows.take(torch.arange(first, min(first + size,
                                                                              len(rows)))))
        counted_BS = targets != IGNORE_INDEX
        logits = model(inputs, mask, document_ids=documents, logits_mask=counted_BS).logits
        if counted:
            sums[0] += torch.nn.functional.cross_entropy(logits.float(), targets[counted_BS],
                                                         reduction="sum")
            sums[1] += counted_BS.sum()
    model.train(was_training)
    total, count = mesh.sum_(sums).tolist()
    return total / max(count, 1)


def answers(model, prompts: list[tuple[dict, ...]], template: str | None, tokenizer,
            max_new_tokens: int = ANSWER_TOKENS, samples: int = 1,
            **sampling) -> list[list[str]]:
    """``samples`` responses (decoded text) to each prompt (a conversation before the
    assistant's turn), ``sampling`` as ``generate`` takes it (default greedy)."""
    ids = [tokenizer.encode(render_chat(list(messages), template, tokenizer.eos_token))
           for messages in prompts for _ in range(samples)]
    outputs = generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id, **sampling)
    texts = [tokenizer.decode(output) for output in outputs]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def answer_accuracy(model, instructions: list[Instruction], template, tokenizer) -> float:
    """Share of instructions answered exactly (greedy decoding)."""
    responses = answers(model, [x.messages(False) for x in instructions], template, tokenizer)
    return sum(exact_answer_reward(x.prompt, r[0]) for x, r in zip(instructions, responses)) \
        / max(len(instructions), 1)


class SupervisedFineTuning:
    """The ``sft`` stage of ``post_train``: ``conversations`` to train on, ``held_out`` ones for
    the validation loss, and ``instructions`` (the embedded set's held-out part) whose exact
    answers each evaluation checks."""

    name = "sft"

    def __init__(self, conversations, held_out, instructions: list[Instruction] = (),
                 epochs: int | None = None):
        self.conversations, self.held_out, self.epochs = conversations, held_out, epochs
        self.instructions = list(instructions)[:ACCURACY_PROMPTS]

    def prepare(self, tokenizer, template, config: TrainConfig) -> TrainConfig:
        """Tokenize and pack; returns the config to train with (``epochs``, when given, set
        its steps)."""
        self.tokenizer, self.template = tokenizer, template
        self.rows = pack(self.conversations, template, tokenizer, config.seq_len)
        self.val_rows = pack(self.held_out, template, tokenizer, config.seq_len)
        if len(self.rows) < config.batch_size:
            raise ValueError(f"the data packs into {len(self.rows)} rows of seq_len="
                             f"{config.seq_len}, fewer than batch_size={config.batch_size}")
        if self.epochs is None:
            return config
        return replace(config, steps=max(1, -(-len(self.rows) * self.epochs
                                              // config.batch_size)))

    def attach(self, model, base: str, mesh: Mesh) -> None:
        pass  # nothing beside the policy

    def step(self, model, optimizer, step: int, config: TrainConfig, mesh: Mesh) -> dict:
        index = batch_indices(len(self.rows), step, config.batch_size, config.seed)
        inputs, targets, mask, documents = self.rows.take(index)
        record = train_step(model, optimizer, inputs, targets, config, mesh, mask, documents)
        return {**record, "tokens": int(mask.sum()), "truncated": self.rows.truncated}

    def evaluate(self, model, config: TrainConfig, mesh: Mesh) -> dict:
        record = {"val_loss": assistant_loss(model, self.val_rows, config, mesh)}
        if self.instructions:
            record["accuracy"] = answer_accuracy(model, self.instructions, self.template,
                                                 self.tokenizer)
        return record
