#!/usr/bin/env python3
"""Does post-training work? The tiny MoE pre-trained by ``moekit.train``, then SFT (full and
LoRA), offline DPO, online DPO, with and without EMA, on the embedded instruction set, in one
table; a LoRA step beside a full fine-tuning step, timed in turns in one run; and held-out
perplexity by position at 4x the pre-training context, before and after a long-context stage
(RoPE base x4, ``long_fraction`` 0.25), beside the same stage with the base unchanged.

    python benchmarks/post_training.py                 # the figures of docs/post_training.md
    python benchmarks/post_training.py --quick         # a smoke run in a minute or two
    python benchmarks/post_training.py --pretrained runs/tiny/checkpoints/step-000300

Columns: held-out exact-answer accuracy (greedy, the held-out instructions), reward (the mean
exact-answer reward of 4 samples per held-out prompt at temperature 1), trainable parameters
and their share, training-state bytes (trainable weights + gradients + AdamW's two moments:
what full fine-tuning and LoRA differ by; computed from the shapes, not a measured peak), and
the median step time. Then the LoRA/full step-time ratio, the steps taking turns (rank 8,
experts included), with its range over rounds, in wall time and in CPU time, beside the
same LoRA step with q, k and v computed apart (no ``lora.SharedInput``) and the frozen
floor's (a step with no adapters that runs the backward LoRA needs: what no adapter
implementation can beat), and one profiled step of each. ``--tables products``: the routed
experts' rank-8 products of a tiny training batch computed three ways side by side (below).
Shared machines are noisy: the header prints the CPU and load; only ratios within one run
compare.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.config import DataConfig, TrainConfig, preset
from moekit.devices import retain_freed_cpu_memory
from moekit.model.io import load_model, load_weights, read_model_config
from moekit.model.transformer import Transformer
from moekit.parallel.mesh import Mesh
from moekit.train import lora
from moekit.train.dpo import DirectPreference
from moekit.train.instructions import exact_answer_reward, instruction_set, preference_set
from moekit.train.data import eval_batches, read_documents, split_tokens
from moekit.train.loop import train
from moekit.train.optim import build_optimizer
from moekit.train.post_train import PostTrainSettings, load_chat_tokenizer, post_train
from moekit.train.sft import SupervisedFineTuning, answer_accuracy, answers, batch_indices
from moekit.train.step import train_step
from moekit.train.tokenizer import load_tokenizer


def _cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if "Model name" in line)
    except (OSError, StopIteration):
        return "unknown CPU"


def _evaluate(folder: Path, held_out) -> tuple[float, float]:
    model = load_model(folder)
    tokenizer, template = load_chat_tokenizer(folder, model.config)
    accuracy = answer_accuracy(model, held_out, template, tokenizer)
    samples = answers(model, [x.messages(False) for x in held_out], template, tokenizer,
                      samples=4, temperature=1.0, seed=0)
    reward = statistics.mean(exact_answer_reward(x.prompt, text)
                             for x, texts in zip(held_out, samples) for text in texts)
    return accuracy, reward


def _trainable(folder: Path, rank: int | None) -> int:
    model = load_model(folder).train()
    if rank is not None:
        lora.add_adapters(model, lora.LoRAConfig(rank))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# The backward a LoRA step cannot skip: every layer's input gradient, down to the first
# layer's attention (whose adapters need it), and no adapters. One weight there trains so that
# the backward runs; a LoRA step's time above this floor is its adapters'.
FLOOR_WEIGHT = "layers.0.attn.q_proj.weight"


def _step_models(base: Path, rank: int) -> dict[str, torch.nn.Module]:
    """Full fine-tuning, LoRA rank ``rank``, the same with every adapted weight computed on its
    own (no ``lora.SharedInput``: what computing q, k and v together saves) and the floor,
    from the same weights."""
    models = {name: load_model(base).train() for name in ("full", "lora", "lora-apart",
                                                           "floor")}
    for name in ("lora", "lora-apart"):
        lora.add_adapters(models[name], lora.LoRAConfig(rank))
    for module in models["lora-apart"].modules():
        if isinstance(module, lora.LoRALinear):
            module.shared_input = None
    for name, parameter in models["floor"].named_parameters():
        parameter.requires_grad_(name == FLOOR_WEIGHT)
    return models


def _step(model, optimizer, stage: SupervisedFineTuning, config: TrainConfig, index: int):
    batch = stage.rows.take(batch_indices(len(stage.rows), index, config.batch_size, 0))
    train_step(model, optimizer, batch[0], batch[1], config, Mesh(), batch[2], batch[3])


def _step_times(models, optimizers, stage: SupervisedFineTuning, config: TrainConfig,
                rounds: int) -> dict[str, dict[str, list[float]]]:
    """The models' steps on the same batches, taking turns; the first round is warm-up. Each
    step's wall time and this process's CPU time (all its threads): on a shared machine the
    second counts less of the other jobs' time (a thread waiting for a core uses none)."""
    times = {clock: {name: [] for name in models} for clock in ("wall", "cpu")}
    for index in range(rounds + 1):
        for name, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            _step(model, optimizers[name], stage, config, index)
            if index:
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.process_time() - cpu)
    return times


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")  # on a CPU, grouped_mm's too


def _matmul_profile(models, optimizers, stage, config, steps: int = 5) -> dict[str, tuple]:
    """Per model, one step's matmul calls, their self CPU ms and all operators' (the least of
    ``steps`` profiled steps, taking turns: the least is the one least slowed by other jobs)."""
    found = {name: [] for name in models}
    for index in range(steps):
        for name, model in models.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as run:
                _step(model, optimizers[name], stage, config, index)
            events = run.key_averages()
            matmuls = [e for e in events if e.key in MATMULS]
            found[name].append((sum(e.count for e in matmuls),
                                sum(e.self_cpu_time_total for e in matmuls) / 1e3,
                                sum(e.self_cpu_time_total for e in events) / 1e3))
    return {name: min(runs, key=lambda r: r[2]) for name, runs in found.items()}


@torch.no_grad()
def _loss_by_position(folder: Path, tokens: torch.Tensor, seq_len: int, buckets: int,
                      batches: int) -> list[float]:
    """Mean cross-entropy per position bucket of consecutive held-out windows of ``seq_len``."""
    config = read_model_config(folder)
    model = Transformer(replace(config, max_seq_len=max(config.max_seq_len, seq_len)))
    load_weights(model, folder)
    model.eval()
    sums = torch.zeros(seq_len, dtype=torch.float64)
    count = 0
    for inputs, targets in eval_batches(tokens, 8, seq_len, batches):
        losses = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten(),
                                 reduction="none").view(targets.shape)
        sums += losses.double().sum(0)
        count += len(inputs)
    per_bucket = seq_len // buckets
    return [float(sums[i * per_bucket:(i + 1) * per_bucket].mean()) / count
            for i in range(buckets)]


def long_context(pretrained: Path, work: Path, steps: int, original: int) -> None:
    """Held-out perplexity by position at 4x the pre-training context, before and after a
    long-context stage (RoPE base x4, a quarter of the windows from long documents), beside
    the same stage with the base unchanged."""
    length = 4 * original
    config = read_model_config(pretrained)
    stage = TrainConfig(steps=steps, seq_len=length, batch_size=8, lr=3e-4, warmup_steps=5,
                        long_fraction=0.25, eval_every=10**6, checkpoint_every=10**6)
    folders = {"pre-trained": pretrained}
    for name, base in (("stage, RoPE base x4", 4 * config.rope_base),
                       ("stage, base unchanged", config.rope_base)):
        folders[name] = train(None, stage, DataConfig(), work / name.replace(" ", "-"),
                              init_from=pretrained, model_overrides={"rope_base": base},
                              show_progress=False).checkpoint
    tokens = split_tokens(read_documents(()), load_tokenizer(pretrained),
                          DataConfig().val_fraction).val
    buckets = 4
    edges = [f"{i * length // buckets}-{(i + 1) * length // buckets}" for i in range(buckets)]
    print(f"\nheld-out perplexity by position at {length} tokens (4x the {original} of "
          f"pre-training), {steps} stage steps:")
    print(f"{'model':24}" + "".join(f"{edge:>10}" for edge in edges))
    for name, folder in folders.items():
        losses = _loss_by_position(folder, tokens, length, buckets, batches=4)
        print(f"{name:24}" + "".join(f"{math.exp(loss):10.1f}" for loss in losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrained", type=Path,
                        help="start from this checkpoint of the tiny preset (a moekit train "
                        "run's) instead of pre-training one")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--long-steps", type=int, default=100)
    parser.add_argument("--tables", default="post,long",
                        help="post (post-training, ending with the step times), steps (the "
                        "LoRA and full step times alone), long (long-context stage), products "
                        "(the experts' rank-8 products three ways), or several, "
                        "comma-separated")
    parser.add_argument("--threads", type=int,
                        help="torch's CPU threads (default: torch's own choice); with 1, CPU "
                        "time counts less of other jobs on a shared machine")
    args = parser.parse_args()
    retain_freed_cpu_memory(training=True)  # as `moekit train`, `sft` and `dpo` run
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_steps, args.sft_steps, args.dpo_steps, args.rounds = 20, 10, 4, 3
        args.long_steps = 3
    torch.manual_seed(0)
    print(f"{_cpu()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    if "products" in args.tables:
        rank_products(preset("tiny"), args.rounds)
    if not {"post", "steps", "long"} & set(args.tables.split(",")):
        return
    work = Path(tempfile.mkdtemp(prefix="moekit-post-training-"))
    pretrain = TrainConfig(steps=args.pretrain_steps)
    pretrained = args.pretrained or train(preset("tiny"), pretrain, DataConfig(),
                                          work / "pretrain", show_progress=False).checkpoint
    print(f"pre-trained model: {pretrained}")
    if "post" in args.tables:
        post_training(pretrained, work, args)
    if "steps" in args.tables and "post" not in args.tables:  # the post table ends with it
        step_times(pretrained, args.rounds)
    if "long" in args.tables:
        long_context(pretrained, work, args.long_steps, pretrain.seq_len)
    print(f"runs in {work}")


def post_training(pretrained: Path, work: Path, args) -> None:
    train_set, held_out = instruction_set()
    held_out = held_out[:100]
    sft_config = _sft_config(args.sft_steps)
    dpo_config = replace(sft_config, steps=args.dpo_steps, lr=1e-4, warmup_steps=0,
                         batch_size=8)

    def stage_run(name, stage, config, init_from, **settings) -> tuple[Path, float]:
        """The run's last checkpoint and its median step time (from its metrics)."""
        result = post_train(stage, PostTrainSettings(stage=stage.name,
                                                     init_from=str(init_from), **settings),
                            config, work / name, show_progress=False)
        records = [json.loads(line) for line in (result.run / "metrics.jsonl").open()]
        return result.checkpoint, statistics.median(
            r["tokens"] / r["tokens_per_s"] for r in records if r["kind"] == "train")

    def sft_stage():
        return SupervisedFineTuning([x.messages() for x in train_set],
                                    [x.messages() for x in held_out[:16]])

    def dpo_stage(online: int):
        return DirectPreference(preference_set(train_set), preference_set(held_out[:16]),
                                sft_weight=0.1, prompts=[x.messages(False) for x in train_set],
                                online_prompts=online)

    results = [("pre-trained", pretrained, None, None)]
    sft, seconds = stage_run("sft", sft_stage(), sft_config, pretrained)
    results.append(("SFT", sft, None, seconds))
    folder, seconds = stage_run("sft-lora", sft_stage(), sft_config, pretrained,
                                lora=lora.LoRAConfig(8))
    results.append(("SFT, LoRA rank 8", folder, 8, seconds))
    for name, online, ema in (("offline DPO", 0, None), ("offline DPO + EMA 0.9", 0, 0.9),
                              ("offline + online DPO", 4, None),
                              ("offline + online DPO + EMA 0.9", 4, 0.9)):
        folder, seconds = stage_run(name.replace(" ", "-"), dpo_stage(online), dpo_config, sft,
                                    ema_decay=ema)
        results.append((name, folder.parent.parent / "ema" if ema else folder, None, seconds))

    full_params = _trainable(pretrained, None)
    print(f"\n{'model':32} {'accuracy':>9} {'reward':>7} {'trainable':>12} {'share':>6} "
          f"{'state MB':>9} {'s/step':>7}")
    for name, folder, rank, seconds in results:
        accuracy, reward = _evaluate(folder, held_out)
        trainable = _trainable(pretrained, rank) if seconds else 0
        state = trainable * 4 * 4 / 1e6  # fp32 weight, gradient, 2 moments
        print(f"{name:32} {accuracy:9.1%} {reward:7.3f} {trainable:12,} "
              f"{trainable / full_params:6.1%} {state:9.2f} "
              f"{'' if seconds is None else f'{seconds:7.3f}'}")
    print("(EMA rows evaluate RUN/ema/, the averaged weights; DPO rows start from the SFT row)")
    step_times(pretrained, args.rounds)


def _sft_config(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, lr=1e-3, warmup_steps=10, eval_every=10**6,
                       checkpoint_every=10**6, seq_len=128)


def step_times(pretrained: Path, rounds: int) -> None:
    """A LoRA rank-8 step (experts included) and the floor beside a full fine-tuning step, in
    turns, then one profiled step of each."""
    train_set, held_out = instruction_set()
    stage = SupervisedFineTuning([x.messages() for x in train_set],
                                 [x.messages() for x in held_out[:16]])
    model = load_model(pretrained)
    sft_config = _sft_config(rounds + 1)
    stage.prepare(*load_chat_tokenizer(pretrained, model.config), sft_config)
    full_params = _trainable(pretrained, None)
    models = _step_models(pretrained, 8)
    optimizers = {name: build_optimizer(m, sft_config) for name, m in models.items()}
    times = _step_times(models, optimizers, stage, sft_config, rounds)
    print(f"\nLoRA rank 8 step (trainable share {_trainable(pretrained, 8) / full_params:.1%}), "
          f"the same with q, k, v computed apart, and the frozen floor (no adapters, the "
          f"backward LoRA needs) / full fine-tuning step, {rounds} rounds in turns (load "
          f"average now {os.getloadavg()[0]:.1f}):")
    for clock, label in (("wall", "wall time"), ("cpu", "CPU time")):
        full = times[clock]["full"]
        cells = []
        for name in ("lora", "lora-apart", "floor"):
            ratios = [t / f for t, f in zip(times[clock][name], full)]
            cells.append(f"{name} {statistics.median(ratios):.2f}x [{min(ratios):.2f}-"
                         f"{max(ratios):.2f}] ({statistics.median(times[clock][name]) * 1e3:.0f}"
                         f" ms)")
        print(f"  {label:9}  full {statistics.median(full) * 1e3:.0f} ms; " + "; ".join(cells))
    print("  one step profiled (the least of 5): matmul calls, their self CPU ms, all ops' ms")
    for name, (calls, matmul_ms, total_ms) in _matmul_profile(models, optimizers, stage,
                                                               sft_config).items():
        print(f"    {name:10} {calls:5} matmuls {matmul_ms:7.1f} ms of {total_ms:7.1f} ms")



def _best_seconds(forms: dict, rounds: int, calls: int = 5) -> dict[str, float]:
    """Each form's least time per call over ``rounds`` rounds, the forms taking turns."""
    best = dict.fromkeys(forms, math.inf)
    for _ in range(rounds + 1):
        for name, form in forms.items():
            start = time.perf_counter()
            for _ in range(calls):
                form()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def rank_products(config, rounds: int, rank: int = 8) -> None:
    """The four rank-R products of LoRA on the routed experts' input projection [E, I, D] for
    one tiny training batch (16 x 128 tokens, top-k routes, a seeded uniform routing): x A^T,
    g B, and the factors' gradients (g B)^T x and (x A^T)^T g, per expert's block of rows.
    Three ways: torch's grouped matmul (what ``LoRAExperts`` runs; on a CPU a loop of small
    matmuls), one dense product over every expert's factors [E * R, D] with each row's other
    experts' columns masked to zero (exact: E-fold the products' arithmetic, far fewer
    calls), and batched matmuls over the rows padded per expert (the copies in and out
    counted). All three are checked against each other first."""
    moe = config.moe
    experts, hidden, inner = moe.num_experts, moe.hidden_size, 2 * moe.ffn_size
    generator = torch.Generator().manual_seed(0)
    expert_N = torch.randint(0, experts, (16 * 128 * moe.top_k,), generator=generator).sort()[0]
    counts_E = torch.bincount(expert_N, minlength=experts)
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    rows = len(expert_N)
    x_ND, g_NI = torch.randn(rows, hidden), torch.randn(rows, inner)
    A_ERD, B_EIR = torch.randn(experts, rank, hidden), torch.randn(experts, inner, rank)

    def grouped():
        low_NR = F.grouped_mm(x_ND, A_ERD.transpose(1, 2), offs=offsets_E)
        grad_low_NR = F.grouped_mm(g_NI, B_EIR, offs=offsets_E)
        return (low_NR, grad_low_NR, F.grouped_mm(grad_low_NR.t(), x_ND, offs=offsets_E),
                F.grouped_mm(low_NR.t(), g_NI, offs=offsets_E).mT)

    # Each row's own expert's R columns of the E * R: the mask is made once per forward.
    own_NC = (expert_N[:, None] == torch.arange(experts).repeat_interleave(rank)).float()
    A_CD = A_ERD.reshape(experts * rank, hidden)
    B_IC = B_EIR.permute(1, 0, 2).reshape(inner, experts * rank)

    def masked_dense():
        low_NC = (x_ND @ A_CD.t()) * own_NC
        grad_low_NC = (g_NI @ B_IC) * own_NC
        return (low_NC, grad_low_NC, grad_low_NC.t() @ x_ND, g_NI.t() @ low_NC)

    longest = int(counts_E.max())
    slot_N = torch.arange(rows) - (offsets_E - counts_E).repeat_interleave(counts_E) + (
        expert_N * longest)  # each row's place in the padded [E * longest] rows

    def padded(t_NX):
        out = t_NX.new_zeros(experts * longest, t_NX.shape[1])
        return out.index_copy_(0, slot_N, t_NX).view(experts, longest, -1)

    def padded_bmm():
        x_ELD, g_ELI = padded(x_ND), padded(g_NI)
        low_ELR = torch.bmm(x_ELD, A_ERD.transpose(1, 2))
        grad_low_ELR = torch.bmm(g_ELI, B_EIR)
        return (low_ELR.view(-1, rank)[slot_N], grad_low_ELR.view(-1, rank)[slot_N],
                torch.bmm(grad_low_ELR.transpose(1, 2), x_ELD),
                torch.bmm(low_ELR.transpose(1, 2), g_ELI).mT)

    reference = grouped()
    low_NC, grad_low_NC, grad_A_CD, grad_B_IC = masked_dense()
    own_block = (torch.arange(rows), expert_N)  # each row's own R columns, as [N, R]
    dense_in_blocks = (low_NC.view(rows, experts, rank)[own_block],
                       grad_low_NC.view(rows, experts, rank)[own_block],
                       grad_A_CD.view(experts, rank, hidden),
                       grad_B_IC.view(inner, experts, rank).permute(1, 0, 2))
    for other in (dense_in_blocks, padded_bmm()):
        for got, want in zip(other, reference):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    best = _best_seconds({"grouped": grouped, "masked dense": masked_dense,
                          "padded bmm": padded_bmm}, rounds)
    print(f"\nThe experts' four rank-{rank} products (input projection, {experts} experts, "
          f"D {hidden}, I {inner}, {rows} rows), least of {rounds} rounds in turns (load "
          f"average now {os.getloadavg()[0]:.1f}):")
    for name, seconds in best.items():
        print(f"  {name:12} {seconds * 1e6:7.0f} us  {seconds / best['grouped']:.2f}x grouped")

if __name__ == "__main__":
    main()
