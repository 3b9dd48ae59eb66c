"""Router health: expert similarity against a hand loop, the step's statistics without device
reads per micro-batch, `moekit plot` and `moekit inspect` on a tiny run."""
import collections
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from moekit.cli import main
from moekit.config import DataConfig, ModelConfig, MoEConfig, TrainConfig
from moekit.model import Transformer
from moekit.model.io import load_model
from moekit.moe import GroupedExperts, ModuleExperts
from moekit.moe.experts import expert_weight_rows
from moekit.parallel.mesh import Mesh
from moekit.train.health import CollapseThresholds, collapse_flags, mean_pairwise_cosine
from moekit.train.checkpoint import checkpoint_folder
from moekit.train.loop import train
from moekit.train.step import moe_layers, train_step

MODEL = ModelConfig(vocab_size=300, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
                    max_seq_len=32, moe=MoEConfig(hidden_size=16, ffn_size=16, num_experts=4,
                                                  top_k=2))
TRAIN = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1, eval_every=4,
                    eval_batches=1, checkpoint_every=4, similarity_every=2)


def _cosine_by_hand(vectors):
    pairs = [(i, j) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    total = 0.0
    for i, j in pairs:
        a, b = vectors[i].detach().double(), vectors[j].detach().double()
        total += float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
    return total / len(pairs)


def test_expert_similarity_is_the_mean_pairwise_cosine():
    experts = GroupedExperts(4, 8, 6)
    vectors = [torch.cat([experts.gate_up_proj[e].flatten(), experts.down_proj[e].flatten()])
               for e in range(4)]
    got = mean_pairwise_cosine(expert_weight_rows(experts))
    assert got == pytest.approx(_cosine_by_hand(vectors), rel=1e-12)
    with torch.no_grad():  # upcycled copies of one FFN start at 1
        experts.gate_up_proj.copy_(experts.gate_up_proj[:1].expand(4, -1, -1))
        experts.down_proj.copy_(experts.down_proj[:1].expand(4, -1, -1))
    assert mean_pairwise_cosine(expert_weight_rows(experts)) == pytest.approx(1.0)
    assert expert_weight_rows(ModuleExperts([nn.Linear(8, 8), nn.Linear(8, 8, bias=False)])) is None
    linears = [nn.Linear(8, 8) for _ in range(3)]
    rows = expert_weight_rows(ModuleExperts(linears))
    assert mean_pairwise_cosine(rows) == pytest.approx(_cosine_by_hand(
        [torch.cat([m.weight.detach().flatten(), m.bias.detach().flatten()]) for m in linears]))


READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.bincount, torch.bincount, torch.unique, torch.masked_select,
         torch.Tensor.cpu}


class Reads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.seen[func.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lb_scope", ["micro", "global", "step"])
def test_the_step_reads_the_device_as_often_with_four_micro_batches_as_with_one(lb_scope):
    # On a GPU each read (item, tolist, cpu, ...) waits for the device: the router-health sums
    # stay on it over the micro-batches and are read once, with the step's other figures.
    seen = []
    for grad_accum in (1, 4):
        torch.manual_seed(0)
        model = Transformer(MODEL).train()
        tokens = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
        config = replace(TRAIN, grad_accum=grad_accum, lb_scope=lb_scope)
        with Reads() as reads:
            record = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                tokens[:, :-1], tokens[:, 1:], config, Mesh())
        seen.append(reads.seen)
        assert record["router_entropy"][0] > 0
    assert seen[0] == seen[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("health") / "run"
    train(MODEL, TRAIN, DataConfig(vocab_size=300), folder, show_progress=False)
    return folder


def test_expert_similarity_is_logged_every_similarity_every_steps(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["expert_similarity"] for r in records
              if r["kind"] == "train" and "expert_similarity" in r}
    assert sorted(logged) == [2, 4]
    model = load_model(checkpoint_folder(run, 4))  # the weights after step 4
    for layer, value in zip(moe_layers(model), logged[4]):
        vectors = [torch.cat([layer.experts.gate_up_proj[e].flatten(),
                              layer.experts.down_proj[e].flatten()]) for e in range(4)]
        assert value == pytest.approx(_cosine_by_hand(vectors), rel=1e-6)


def test_plot_redraws_the_router_health_pngs(run, capsys):
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    assert main(["plot", str(run)]) == 0
    names = {path.name for path in (run / "plots").iterdir()}
    assert {"loss.png", "expert_load.png", "load_layer_0.png", "load_layer_1.png",
            "router_ratios.png", "imbalance.png", "expert_similarity.png"} <= names
    assert not any(name.endswith(".partial") for name in names)
    assert all((run / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in names)


def test_inspect_prints_a_table_per_layer_and_flags_by_its_thresholds(run, capsys, tmp_path):
    assert main(["inspect", str(checkpoint_folder(run, 4))]) == 0
    out = capsys.readouterr().out
    assert "MoE layer 0" in out and "MoE layer 1" in out and "validation split" in out
    # The imbalance limit at its minimum flags every layer whose load is not exactly even.
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["inspect", str(run), "--data", str(text), "--max-load-over-mean", "1"]) == 0
    out = capsys.readouterr().out
    assert "held_out.txt" in out and "2 of 2 MoE layers flagged" in out and "max/mean load" in out


def test_collapse_flags_by_hand():
    health = {"tokens_per_expert": [10, 0, 5, 5], "max1_over_max2": 1.01,
              "load_max_over_mean": 2.0}
    flags = collapse_flags(health, CollapseThresholds())
    assert flags == ["experts [1] got fewer than 1 tokens", "max1/max2 1.010 < 1.05"]
    assert collapse_flags(health, CollapseThresholds(0, 1.0, 1.9)) == ["max/mean load 2.00 > 1.9"]


@pytest.mark.parametrize("argv, words", [
    (["inspect", "{tmp}"], ["not a checkpoint", "not a run folder"]),
    (["inspect", "{tmp}/missing"], ["not a folder"]),
    (["inspect", "{run}", "--max-load-over-mean", "0.5"], ["max_load_over_mean=0.5", ">= 1"]),
    (["inspect", "{run}", "--data", "{tmp}/none.txt"], ["does not exist"]),
    (["plot", "{tmp}"], ["not a moekit run folder", "metrics.jsonl"]),
])
def test_bad_health_input_is_one_line_and_exit_2(argv, words, run, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_similarity_every_is_refused():
    with pytest.raises(ValueError, match=r"similarity_every=-1.*integer >= 0"):
        TrainConfig(similarity_every=-1)


def test_inspect_outside_a_run_needs_data(run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(checkpoint_folder(run, 4), copy)
    assert main(["inspect", str(copy)]) == 2
    assert "not inside a run folder" in capsys.readouterr().err
    text = tmp_path / "text.md"
    text.write_text("# Notes\n\nSome held-out text, long enough for a window or two. " * 5)
    assert main(["inspect", str(copy), "--data", str(text), "--batches", "1"]) == 0
    assert "MoE layer 1" in capsys.readouterr().out


def _similarity_with_experts_spread(rank, world):
    import torch.distributed as dist

    from moekit.parallel.expert_parallel import shard_experts
    from moekit.parallel.mesh import world_mesh
    from moekit.train.health import expert_similarities
    torch.manual_seed(0)
    model = Transformer(MODEL)
    shard_experts(model, dist.group.WORLD, rank, world)
    return expert_similarities(model, world_mesh(expert=world))


def test_expert_similarity_gathers_the_experts_spread_over_ranks():
    from moekit.parallel.processes import run_on_ranks
    from moekit.train.health import expert_similarities
    torch.manual_seed(0)
    whole = expert_similarities(Transformer(MODEL))
    for outcome in run_on_ranks(_similarity_with_experts_spread, 2):
        assert outcome == pytest.approx(whole, rel=1e-12)


def test_plot_reads_a_metrics_file_being_appended(tmp_path):
    from moekit.train.plots import read_records
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert read_records(metrics) == [{"kind": "train", "step": 1}]  # the last line is unfinished
    metrics.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_records(metrics)
