"""PNG plots of a run from its metrics: losses, per-layer drop rate, expert-load heatmap."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_run(records: list[dict], folder: str | Path) -> list[Path]:
    """Write loss.png, for MoE runs drop_rate.png and expert_load.png, and for DPO runs
    dpo.png; returns the paths."""
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
    if train and "margin" in train[-1]:
        written.append(plot_preferences(records, folder))
    return written


def plot_preferences(records: list[dict], folder: str | Path) -> Path:
    """dpo.png: a DPO run's chosen and rejected rewards, their margin, the preference accuracy
    and the KL to the reference, per training step."""
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
    kl.plot(steps, [r["kl"] for r in train], lw=1)
    kl.set(xlabel="step", ylabel="nats per response token", title="KL to the reference")
    return _save(plt, figure, Path(folder) / "dpo.png")


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
