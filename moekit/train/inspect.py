"""`moekit inspect`: an evaluation forward of a checkpoint over held-out text, its router
health per MoE layer (the keys of metrics.jsonl, and expert similarity), and the layers whose
router is collapsing by ``health.CollapseThresholds``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.model.io import load_model
from moekit.train.checkpoint import CHECKPOINTS, resolve_checkpoint
from moekit.train.data import check_length, eval_batches, read_documents, split_tokens
from moekit.train.health import CollapseThresholds, collapse_flags, expert_similarities
from moekit.train.loop import RUN_FILE, read_run
from moekit.train.step import layer_health, moe_layers
from moekit.train.tokenizer import load_tokenizer


@dataclass
class Inspection:
    """`moekit inspect`'s findings: per MoE layer its health (metrics.jsonl's keys), the
    layer's expert similarity and its collapse flags; and what text was read."""

    checkpoint: Path
    source: str
    num_tokens: int
    layers: list[dict]


@torch.no_grad()
def inspect_checkpoint(path: str | Path, data: str | Path | None = None, *,
                       batches: int = 8, batch_size: int = 8,
                       thresholds: CollapseThresholds = CollapseThresholds()) -> Inspection:
    """An evaluation forward of the checkpoint ``path`` (or a run folder's newest) over held-out
    text: ``data`` (a .txt, .md or .jsonl file or folder) or by default the validation split of
    the run the checkpoint belongs to; up to ``batches`` batches of ``batch_size`` windows."""
    folder = resolve_checkpoint(path)
    model = load_model(folder)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{folder}: the model has no MoE layers to inspect")
    tokenizer = load_tokenizer(folder)
    run = folder.parent.parent
    if data is not None:
        ids = [token for document in tokenizer.encode_batch(read_documents([str(data)]))
               for token in document + [tokenizer.eos_id]]
        tokens, source = torch.tensor(ids, dtype=torch.long), str(data)
        seq_len = min(model.config.max_seq_len, 256)
    elif folder.parent.name == CHECKPOINTS and (run / RUN_FILE).is_file():
        _, train_config, data_config = read_run(run)
        tokens = split_tokens(read_documents(data_config.corpus), tokenizer,
                              data_config.val_fraction).val
        source, seq_len = f"the validation split of {run}", train_config.seq_len
    else:
        raise ValueError(f"{folder} is not inside a run folder (no {run / RUN_FILE}), so it "
                         "has no validation split: give --data FILE")
    seq_len = min(seq_len, max(tokens.numel() - 1, 1))
    check_length(tokens, seq_len, "held-out")
    totals, sums, counted = None, None, 0
    for inputs, _ in eval_batches(tokens, batch_size, seq_len, batches):
        stats = model(inputs).moe_stats
        counts = [s.counts for s in stats]
        layer_sums = [[float("nan") if x is None else float(x) for x in
                       (s.entropy_sum, s.top1_over_top2_sum, s.top2_over_top3_sum)]
                      for s in stats]
        totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
        sums = layer_sums if sums is None else [[a + b for a, b in zip(x, y)]
                                                for x, y in zip(sums, layer_sums)]
        counted += inputs.numel()
    similarities = expert_similarities(model)
    findings = []
    for index, (layer_counts, layer_sums) in enumerate(zip(totals, sums)):
        health = layer_health(layer_counts, layer_sums)
        findings.append({"layer": index, **health, "expert_similarity": similarities[index],
                         "flags": collapse_flags(health, thresholds)})
    return Inspection(folder, source, counted, findings)
