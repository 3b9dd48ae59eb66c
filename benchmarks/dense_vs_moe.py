"""Does MoE pay? Dense vs MoE vs upcycled MoE at equal training FLOPs, on the embedded corpus.

Three runs of the same number of steps, batch and sequence length:
  dense     the tiny preset's dense variant (SwiGLU FFN of width 256 in every layer)
  moe       the tiny MoE: 8 experts of width 128, top-2 -> the same active FFN parameters
  upcycled  the dense run's checkpoint at --upcycle-at of the budget, upcycled (fine-grained,
            granularity 2: each FFN cut into 2 slices, 4 copies of each = the same 8 x 128 top-2
            MoE, logits exact at the switch), then trained for the rest of the steps
Training FLOPs per step are equal up to the router (a D x E matrix per MoE layer), so the
validation loss at a given step compares the three at equal compute (FastMoE's claim: the MoE
converges faster). Prints the table, saves the plot.

    python benchmarks/dense_vs_moe.py --steps 300 --out runs/dense_vs_moe
    python benchmarks/dense_vs_moe.py --capacity-factor 0 --expert-lr-rule same   # an ablation
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from moekit.config import DataConfig, MoEConfig, TrainConfig, preset
from moekit.convert import upcycle
from moekit.model import load_model, save_model
from moekit.plan import training_flops_per_token
from moekit.train.loop import train


def _validation(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def _upcycled_start(dense_run: Path, step: int, moe: MoEConfig, folder: Path) -> Path:
    """The dense checkpoint of ``step``, upcycled into the MoE ``moe``, as a model folder."""
    checkpoint = dense_run / "checkpoints" / f"step-{step:06d}"
    dense = load_model(checkpoint)
    coarse = replace(moe, num_experts=moe.num_experts // 2, top_k=moe.top_k // 2,
                     ffn_size=dense.config.ffn_size)
    save_model(upcycle(dense, coarse, granularity=2, seed=0), folder, tokenizer_from=checkpoint)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--upcycle-at", type=float, default=0.5,
                        help="share of the budget the dense model trains before upcycling")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/dense_vs_moe")
    parser.add_argument("--capacity-factor", type=float, default=1.25,
                        help="of the MoE runs in training (0 = dropless)")
    parser.add_argument("--expert-lr-rule", default="sqrt_tokens", choices=("sqrt_tokens", "same"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    switch = round(args.steps * args.upcycle_at / args.eval_every) * args.eval_every
    config = TrainConfig(steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                         checkpoint_every=switch, keep_checkpoints=args.steps,
                         expert_lr_rule=args.expert_lr_rule)
    data = DataConfig()
    tiny = preset("tiny")
    model = replace(tiny, moe=replace(tiny.moe, capacity_factor=args.capacity_factor or None,
                                      adaptive_aux=bool(args.capacity_factor)))

    runs = {"dense": out / "dense", "moe": out / "moe"}
    train(model.dense(), config, data, runs["dense"], show_progress=False)
    train(model, config, data, runs["moe"], show_progress=False)
    start = _upcycled_start(runs["dense"], switch, model.moe, out / "upcycled-start")
    rest = replace(config, steps=args.steps - switch, warmup_steps=0,
                   checkpoint_every=args.steps)
    runs["upcycled"] = out / "upcycled"
    train(None, rest, data, runs["upcycled"], init_from=start, show_progress=False)

    curves = {name: _validation(run) for name, run in runs.items()}
    curves["upcycled"] = {**{s: v for s, v in curves["dense"].items() if s <= switch},
                          **{switch + s: v for s, v in curves["upcycled"].items()}}
    configs = {"dense": model.dense(), "moe": model, "upcycled": load_model(start).config}
    flops = {name: training_flops_per_token(c, config.seq_len).model_flops
             for name, c in configs.items()}
    print_table(curves, flops, config, switch)
    plot(curves, switch, out / "dense_vs_moe.png")


def print_table(curves, flops, config, switch) -> None:
    tokens = config.batch_size * config.seq_len
    print("training FLOPs per step: " + ", ".join(
        f"{name} {value * tokens:.3g}" for name, value in flops.items()))
    print(f"validation loss (nats/token); upcycled = dense until step {switch}, then the MoE")
    print(f"{'step':>6} {'dense':>8} {'moe':>8} {'upcycled':>9}")
    for step in sorted(curves["dense"]):
        print(f"{step:>6} " + " ".join(f"{curves[name].get(step, float('nan')):>8.3f}"
                                       for name in ("dense", "moe", "upcycled")))


def plot(curves, switch, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axes.plot(list(curve), list(curve.values()), "o-", ms=3, label=name)
    axes.axvline(switch, color="gray", ls=":", lw=1)
    axes.set(xlabel="step (equal training FLOPs per step)", ylabel="validation loss",
             title="Dense vs MoE vs upcycled, tiny preset")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
