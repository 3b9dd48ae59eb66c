#!/usr/bin/env python3
"""The synthetic benchmark of the MMoE paper (Ma et al., KDD 2018, section 3.2): two regression
tasks whose label correlation falls with p, learned by a shared-bottom model, a one-gate MoE
(OMoE) and a multi-gate MoE (MMoE, moekit.moe.MultiGateMoE), over several seeds.

    python examples/mmoe_synthetic.py                      # prints the table, writes the plot
    python examples/mmoe_synthetic.py --seeds 5 --steps 2000 --plot mmoe.png --overwrite

Data: u1, u2 orthogonal unit vectors in R^d; w1 = c u1, w2 = c (p u1 + sqrt(1 - p^2) u2);
x ~ N(0, I); y_k = w_k . x + sum_{i=1..m} sin(alpha_i w_k . x + beta_i) + N(0, 0.01), alpha_i and
beta_i ~ N(0, 1) shared by both tasks; d = 100, c = 1, m = 10. Each seed draws u1, u2, alpha,
beta, x and the noise once, and only p changes between the rows. The labels' Pearson correlation is measured on the data,
since the sines make it differ from p. Models as the paper's: 8 experts of one ReLU layer of 16
units, towers of 8 units; the shared bottom has 113 units, for about as many parameters.
The figure is each model's held-out loss (MSE of both tasks, summed) after training.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn as nn

from moekit import MoEConfig, ModuleExperts
from moekit.files import check_output
from moekit.moe import MultiGateMoE

DIM, SINES, NUM_EXPERTS, EXPERT_UNITS, TOWER_UNITS, BOTTOM_UNITS = 100, 10, 8, 16, 8, 113
CORRELATIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
MODELS = ("shared-bottom", "OMoE", "MMoE")


def draw_setting(num_examples: int, generator: torch.Generator) -> dict:
    """What one seed draws once for every p: u1, u2, alpha, beta, the inputs and the noise, so
    that the correlation alone changes from one p to the next."""
    return {"u_2D": torch.linalg.qr(torch.randn(DIM, 2, generator=generator)).Q.T,
            "alpha": torch.randn(SINES, generator=generator),
            "beta": torch.randn(SINES, generator=generator),
            "x": torch.randn(num_examples, DIM, generator=generator),
            "noise": 0.1 * torch.randn(num_examples, 2, generator=generator)}  # variance 0.01


def labels(setting: dict, p: float, c: float = 1.0) -> torch.Tensor:
    """y [n, 2] of the paper's two tasks at correlation parameter p."""
    u1, u2 = setting["u_2D"]
    columns = []
    for k, w in enumerate((c * u1, c * (p * u1 + math.sqrt(1 - p ** 2) * u2))):
        z = setting["x"] @ w
        columns.append(z + torch.sin(setting["alpha"] * z[:, None] + setting["beta"]).sum(-1)
                       + setting["noise"][:, k])
    return torch.stack(columns, -1)


def tower(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, TOWER_UNITS), nn.ReLU(), nn.Linear(TOWER_UNITS, 1))


class SharedBottom(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(DIM, BOTTOM_UNITS), nn.ReLU())
        self.towers = nn.ModuleList([tower(BOTTOM_UNITS), tower(BOTTOM_UNITS)])

    def forward(self, x):
        shared = self.bottom(x)
        return torch.cat([t(shared) for t in self.towers], -1)


def experts() -> ModuleExperts:
    return ModuleExperts([nn.Sequential(nn.Linear(DIM, EXPERT_UNITS), nn.ReLU())
                          for _ in range(NUM_EXPERTS)])


class GatedExperts(nn.Module):
    """MMoE (one gate per task) or OMoE (one gate, both towers on its mixture)."""

    def __init__(self, num_gates: int):
        super().__init__()
        config = MoEConfig(hidden_size=DIM, ffn_size=EXPERT_UNITS, num_experts=NUM_EXPERTS)
        towers = [tower(EXPERT_UNITS) for _ in range(2)]
        self.moe = MultiGateMoE(config, num_tasks=num_gates, experts=experts(),
                                towers=towers if num_gates == 2 else [nn.Identity()])
        self.towers = None if num_gates == 2 else nn.ModuleList(towers)

    def forward(self, x):
        outputs, _ = self.moe(x)
        if self.towers is not None:  # OMoE: the one mixture feeds both towers
            outputs = [t(outputs[0]) for t in self.towers]
        return torch.cat(outputs, -1)


def build(name: str) -> nn.Module:
    return {"shared-bottom": SharedBottom, "OMoE": lambda: GatedExperts(1),
            "MMoE": lambda: GatedExperts(2)}[name]()


def held_out_loss(name: str, data, steps: int, seed: int, batch: int = 128) -> float:
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = build(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(x_train), (batch,), generator=generator)
        loss = ((model(x_train[rows]) - y_train[rows]) ** 2).mean(0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((model(x_test) - y_test) ** 2).mean(0).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="data and model seeds per p")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per model")
    parser.add_argument("--examples", type=int, default=10000, help="training examples")
    parser.add_argument("--plot", default="mmoe_synthetic.png", help="PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot")
    args = parser.parse_args(argv)
    try:
        for name in ("seeds", "steps", "examples"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} {getattr(args, name)} is not allowed: expected a "
                                 "positive integer")
        check_output(args.plot, [], overwrite=args.overwrite, option="--plot", kind="file")
    except ValueError as error:
        print(f"mmoe_synthetic: error: {error}", file=sys.stderr)
        return 2
    results = {name: [] for name in MODELS}
    correlations = []
    print(f"{'p':>4} {'label corr':>10} " + " ".join(f"{name:>17}" for name in MODELS))
    settings = [draw_setting(args.examples + 2000, torch.Generator().manual_seed(seed))
                for seed in range(args.seeds)]
    for p in CORRELATIONS:
        losses = {name: [] for name in MODELS}
        measured = []
        for seed, setting in enumerate(settings):
            x, y = setting["x"], labels(setting, p)
            measured.append(float(torch.corrcoef(y.T)[0, 1]))
            data = ((x[:args.examples], y[:args.examples]), (x[args.examples:], y[args.examples:]))
            for name in MODELS:
                losses[name].append(held_out_loss(name, data, args.steps, seed))
        correlations.append(statistics.mean(measured))
        cells = []
        for name in MODELS:
            results[name].append(statistics.mean(losses[name]))
            spread = statistics.stdev(losses[name]) if args.seeds > 1 else 0.0
            cells.append(f"{results[name][-1]:9.4f} +-{spread:6.4f}")
        print(f"{p:4.1f} {correlations[-1]:10.3f} " + " ".join(f"{c:>17}" for c in cells),
              flush=True)
    # Degradation: the slope of the loss against 1 - p, least squares over all rows (steadier
    # than the difference of the two end rows).
    falls = [1 - p for p in CORRELATIONS]
    mean_fall = statistics.mean(falls)
    slope = {name: sum((f - mean_fall) * loss for f, loss in zip(falls, results[name]))
             / sum((f - mean_fall) ** 2 for f in falls) for name in MODELS}
    least = min(slope, key=slope.get)
    print("loss slope against 1 - p (lower: degrades less): "
          + ", ".join(f"{name} {slope[name]:+.4f}" for name in MODELS))
    print(f"MMoE degrades least as p falls: {'yes' if least == 'MMoE' else 'no, ' + least + ' does'}")
    write_plot(args.plot, correlations, results)
    print(f"plot: {args.plot}")
    return 0


def write_plot(path: str, correlations: list[float], results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, losses in results.items():
        axes.plot(CORRELATIONS, losses, "o-", label=name)
    for p, corr, loss in zip(CORRELATIONS, correlations, results["MMoE"]):
        axes.annotate(f"{corr:.2f}", (p, loss), textcoords="offset points", xytext=(0, -12),
                      fontsize="x-small", ha="center")
    axes.invert_xaxis()
    axes.set(xlabel="p (annotated: measured label correlation)",
             ylabel="held-out MSE, both tasks", title="MMoE synthetic benchmark")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models: threads cost more than they bring
    sys.exit(main())
