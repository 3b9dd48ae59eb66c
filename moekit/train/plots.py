"""PNG plots of a run from its metrics: losses, per-layer drop rate, expert-load heatmap, and
router health (per layer: expert load over steps, max1/max2 and max2/max3, imbalance, expert
similarity). Drawn at the end of training and again at any time by `moekit plot RUN`."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def read_records(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a last line still being written is left out."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the trainer is appending it now
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise ValueError(f"{path}: line {number} is not a moekit metrics record")
        records.append(record)
    return records


def plot_run(records: list[dict], folder: str | Path) -> list[Path]:
    """Write loss.png, for MoE runs drop_rate.png, expert_load.png and the router-health
    plots (``plot_router_health``), and for DPO runs dpo.png; returns the paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    written = []

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="training", lw=1)
    axes.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    axes.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    axes.legend()
    written.append(_save(plt, figure, folder / "loss.png"))

    if train and train[-1]["drop_rate"]:
        figure, axes = plt.subplots(figsize=(6, 4))
        for layer, _ in enumerate(train[-1]["drop_rate"]):
            axes.plot([r["step"] for r in train], [r["drop_rate"][layer] for r in train],
                      label=f"MoE layer {layer}", lw=1)
        axes.set(xlabel="step", ylabel="dropped routes / routes", title="Drop rate per layer")
        axes.legend(fontsize="small")
        written.append(_save(plt, figure, folder / "drop_rate.png"))

        window = train[-max(len(train) // 5, 1):]  # the last fifth of training
        load = [[sum(r["expert_load"][layer][e] for r in window) / len(window)
                 for e in range(len(window[0]["expert_load"][layer]))]
                for layer in range(len(window[0]["expert_load"]))]
        figure, axes = plt.subplots(figsize=(6, 1 + 0.5 * len(load)))
        image = axes.imshow(load, aspect="auto", cmap="viridis")
        axes.set(xlabel="expert", ylabel="MoE layer",
                 title=f"Expert load, steps {window[0]['step']}-{window[-1]['step']}")
        figure.colorbar(image, ax=axes, label="share of routes")
        written.append(_save(plt, figure, folder / "expert_load.png"))
        written += plot_router_health(train, folder)
    if train and "margin" in train[-1]:
        written.append(plot_preferences(records, folder))
    return written


def plot_router_health(train: list[dict], folder: Path) -> list[Path]:
    """load_layer_N.png (share of routes per expert over steps), router_ratios.png,
    imbalance.png and expert_similarity.png, from the keys a run logged (older runs lack some:
    their plots are left out)."""
    plt = _pyplot()
    written = []
    with_counts = [r for r in train if "tokens_per_expert" in r]
    for layer in range(len(with_counts[0]["tokens_per_expert"]) if with_counts else 0):
        shares_SE = [[count / max(sum(counts), 1) for count in counts]
                     for counts in (r["tokens_per_expert"][layer] for r in with_counts)]
        share_ES = [list(row) for row in zip(*shares_SE)]
        steps = [r["step"] for r in with_counts]
        figure, axes = plt.subplots(figsize=(7, 1.5 + 0.25 * len(share_ES)))
        image = axes.imshow(share_ES, aspect="auto", cmap="viridis", interpolation="nearest",
                            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(share_ES) - 0.5, -0.5))
        axes.set(xlabel="step", ylabel="expert", title=f"Expert load over steps, MoE layer {layer}")
        figure.colorbar(image, ax=axes, label="share of routes")
        written.append(_save(plt, figure, folder / f"load_layer_{layer}.png"))
    panels = {"router_ratios.png": ("Router sharpness", [
                  ("max1_over_max2", "mean top-1 / top-2 probability"),
                  ("max2_over_max3", "mean top-2 / top-3 probability")]),
              "imbalance.png": ("Load imbalance", [
                  ("load_cv", "coefficient of variation of the load"),
                  ("load_max_over_mean", "max load / mean load")]),
              "expert_similarity.png": ("Expert similarity", [
                  ("expert_similarity", "mean pairwise cosine of expert weights")])}
    for name, (title, keys) in panels.items():
        present = [(key, label) for key, label in keys if any(key in r for r in train)]
        if not present:
            continue
        figure, axes_list = plt.subplots(len(present), 1, figsize=(6, 1 + 2.5 * len(present)),
                                         squeeze=False)
        for axes, (key, label) in zip(axes_list[:, 0], present):
            logged = [r for r in train if key in r]
            for layer in range(len(logged[0][key])):
                points = [(r["step"], r[key][layer]) for r in logged if r[key][layer] is not None]
                axes.plot([p[0] for p in points], [p[1] for p in points], ".-" if len(
                    logged) < 30 else "-", lw=1, label=f"MoE layer {layer}")
            axes.set(xlabel="step", ylabel=label)
            axes.legend(fontsize="x-small")
        axes_list[0, 0].set_title(title)
        written.append(_save(plt, figure, folder / name))
    return written


def plot_preferences(records: list[dict], folder: str | Path) -> Path:
    """dpo.png: a DPO run's chosen and rejected rewards, their margin, the preference accuracy
    and the KL to the reference (where logged), per training step."""
    plt = _pyplot()
    train = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in train]
    figure, (rewards, accuracy, kl) = plt.subplots(1, 3, figsize=(12, 3.5))
    for key in ("chosen_reward", "rejected_reward", "margin"):
        rewards.plot(steps, [r[key] for r in train], label=key.replace("_", " "), lw=1)
    rewards.set(xlabel="step", ylabel="beta * log-ratio", title="Rewards")
    rewards.legend(fontsize="small")
    accuracy.plot(steps, [r["accuracy"] for r in train], lw=1)
    accuracy.set(xlabel="step", ylabel="chosen reward > rejected", title="Preference accuracy",
                 ylim=(0, 1))
    if all("kl" in r for r in train):  # not logged with precomputed reference log-probs
        kl.plot(steps, [r["kl"] for r in train], lw=1)
    kl.set(xlabel="step", ylabel="nats per response token", title="KL to the reference")
    return _save(plt, figure, Path(folder) / "dpo.png")


def _save(plt, figure, path: Path) -> Path:
    """Each PNG whole or not at all: written beside it, then renamed over it."""
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    os.replace(partial, path)
    return path
