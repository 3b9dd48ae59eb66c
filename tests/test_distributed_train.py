"""`moekit train` on several processes: `--nproc` (torch's elastic agent, as torchrun) trains
the run that one process trains, rank 0 writing it; bad layouts are refused before any process
starts."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

CONFIG = """
[model]
vocab_size = 300
hidden_size = 32
num_layers = 2
num_heads = 2
ffn_size = 64
max_seq_len = 64
[model.moe]
hidden_size = 32
ffn_size = 32
num_experts = 4
top_k = 2
[train]
steps = 4
batch_size = 4
seq_len = 32
warmup_steps = 2
eval_every = 2
eval_batches = 2
checkpoint_every = 2
[data]
vocab_size = 300
"""


def _moekit(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True,
                          text=True, timeout=timeout)


def _assert_same_checkpoints(run_a, run_b, step_folder):
    """The two runs' model and optimizer files of ``step_folder`` hold identical tensors."""
    from safetensors.torch import load_file
    for file in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(run / "checkpoints" / step_folder / file) for run in (run_a, run_b))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), file


def _records(run):
    timings = {"tokens_per_s", "model_flops_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in timings}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_one_process_run(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    one = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "one"),
                  "--quiet")
    two = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "two"),
                  "--quiet", "--nproc", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
    got, want = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["kind"] for r in got] == [r["kind"] for r in want]
    # float32: the ranks sum in another order. The first step agrees to rounding; Adam then
    # magnifies the rounding of its smallest gradients, so later steps agree more loosely
    # (float64 agreement to 1e-9 is test_equivalence's).
    for index, (a, b) in enumerate(zip(got, want)):
        for key in ("loss", "router_loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4 if index == 0 else 1e-2), key
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "step-000002", "step-000004"]


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "0"], "--nproc: 0 is not allowed"),
    (["--nproc", "3"], "batch_size=4 is not allowed with 3 data-parallel ranks"),
    (["--nproc", "2", "--collective-timeout", "0"], "--collective-timeout: 0.0 is not allowed"),
    (["--nproc", "2", "--zero", "4"], "--zero: invalid choice: 4"),
    (["--nproc", "2", "--expert", "3"], "expert=3 does not divide num_experts=4"),
    (["--nproc", "4", "--pipeline", "3"], "world_size=4 is not allowed"),
    (["--nproc", "3", "--pipeline", "3"], "pipeline=3 is not allowed: more stages than the "
                                          "model's 2 layers"),
    (["--nproc", "2", "--pipeline", "2", "--stage-layers", "1", "2"],
     "stage_layers=[1, 2] is not allowed"),
    (["--nproc", "2", "--pipeline", "2", "--stage-layers", "2"],
     "expected 2 layer counts, one per stage"),
    (["--nproc", "2", "--tensor", "2"], "tensor=2 is not allowed with expert=1"),
    (["--nproc", "4", "--tensor", "4", "--expert", "4"], "tensor=4 does not divide num_heads=2"),
])
def test_bad_layouts_are_refused_before_any_process_starts(tmp_path, flags, message):
    (tmp_path / "run.toml").write_text(CONFIG)
    result = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                     str(tmp_path / "run"), *flags, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_checkpoint_written_under_expert_parallelism_resumes_on_one_process(tmp_path):
    """Layout-free checkpoints: a run on 2 processes holding 2 of the 4 experts each writes
    every expert; resumed from its step 2 on one process, and one process's step 2 resumed on
    2 such processes, both train the run one process trains (to float32 rounding)."""
    from safetensors.torch import load_file
    (tmp_path / "run.toml").write_text(CONFIG)
    whole = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                    str(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    sharded = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                      str(tmp_path / "sharded"), "--quiet", "--nproc", "2", "--expert", "2")
    assert sharded.returncode == 0, sharded.stderr
    first = tmp_path / "sharded" / "checkpoints" / "step-000002"
    weights = load_file(first / "model.safetensors")
    optimizer = load_file(first / "optimizer.safetensors")
    assert weights["layers.1.ffn.experts.gate_up_proj"].shape[0] == 4  # every expert written
    assert optimizer["layers.1.ffn.experts.down_proj.exp_avg"].shape[0] == 4
    shutil.copytree(tmp_path / "sharded", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    resumed = _moekit("train", "--out", str(tmp_path / "resumed"), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    # And the other way: one process's checkpoint resumed with the experts spread over two.
    shutil.copytree(tmp_path / "whole", tmp_path / "spread")
    shutil.rmtree(tmp_path / "spread" / "checkpoints" / "step-000004")
    spread = _moekit("train", "--out", str(tmp_path / "spread"), "--resume", "--quiet",
                     "--nproc", "2", "--expert", "2")
    assert spread.returncode == 0, spread.stderr
    # Exported from the sharded run: every expert there, the logits transformers computes.
    exported = _moekit("export", "--from", str(tmp_path / "sharded"), "--layout", "mixtral",
                       "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoModelForCausalLM

    from moekit.model import load_model
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits,
                                   load_model(tmp_path / "sharded" / "checkpoints" /
                                              "step-000004")(ids).logits, rtol=1e-4, atol=1e-5)
    want = _records(tmp_path / "whole")
    for run in ("sharded", "resumed", "spread"):
        got = _records(tmp_path / run)
        assert [r["kind"] for r in got] == [r["kind"] for r in want]
        for a, b in zip(got, want):
            for key in ("loss", "val_loss"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4), (run, key)


@pytest.mark.parametrize("layout", [
    ["--pipeline", "2", "--stage-layers", "1", "3"],  # two micro-batches: 1F1B
    ["--tensor", "2", "--expert", "2"],  # EDP
])
def test_pipeline_and_edp_train_the_one_process_run_and_resume_on_one(tmp_path, layout):
    """Two stages of 1 and 3 layers, or an EDP pair: the one-process run's losses and
    checkpoint (every stage's weights and shards, by their names); resumed from step 2 on one
    process, it goes on as the one-process run."""
    from safetensors.torch import load_file
    config = CONFIG.replace("num_layers = 2", "num_layers = 4").replace(
        "batch_size = 4", "batch_size = 4\ngrad_accum = 2")
    (tmp_path / "run.toml").write_text(config)
    for name, flags in (("whole", []), ("staged", ["--nproc", "2", *layout])):
        result = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                         str(tmp_path / name), "--quiet", *flags)
        assert result.returncode == 0, result.stderr
    for file in ("model.safetensors", "optimizer.safetensors"):
        whole, staged = (load_file(tmp_path / name / "checkpoints" / "step-000004" / file)
                         for name in ("whole", "staged"))
        assert {k for k in staged if not k.startswith("rng.torch.rank")} == set(whole)
        # float32, summed in another order by the tensor-parallel blocks, then 4 Adam steps:
        # where a gradient is near zero Adam moves by about lr * its sign, which rounding can
        # flip (so up to ~1e-4 here); float64 agreement to 1e-9 is test_equivalence's
        for key in (k for k in whole if not k.startswith("rng.")):  # random states: per layout
            torch.testing.assert_close(staged[key], whole[key], rtol=1e-3, atol=2e-4)
    shutil.copytree(tmp_path / "staged", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    resumed = _moekit("train", "--out", str(tmp_path / "resumed"), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    want = _records(tmp_path / "whole")
    for run in ("staged", "resumed"):
        got = _records(tmp_path / run)
        assert [r["kind"] for r in got] == [r["kind"] for r in want]
        for a, b in zip(got, want):
            for key in ("loss", "router_loss", "grad_norm", "val_loss"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], rel=1e-4), (run, key)


FAULT = """
import os, time
from moekit.moe.layer import MoELayer

original_forward = MoELayer.forward
calls = [0]


def faulty_forward(self, *args, **kwargs):
    if self.training and os.environ.get("RANK") == "1":
        calls[0] += 1
        # rank 1's fifth step: two MoE layers a step, after the two forwards of the
        # backward that settles DDP's buckets (moekit.parallel.parallelize)
        if calls[0] == 11:
            if os.environ["MOEKIT_TEST_FAULT"] == "raise":
                raise RuntimeError("injected failure")
            time.sleep(3600)
    return original_forward(self, *args, **kwargs)


MoELayer.forward = faulty_forward
"""


@pytest.mark.parametrize("fault", ["raise", "stall"])
def test_a_rank_that_fails_ends_every_rank_in_time(tmp_path, fault):
    import os
    import time
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)  # imported by every worker
    (tmp_path / "run.toml").write_text(CONFIG.replace("steps = 4", "steps = 8"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fault"), "MOEKIT_TEST_FAULT": fault}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "train", "--config", str(tmp_path / "run.toml"),
         "--out", str(tmp_path / "run"), "--quiet", "--nproc", "2", "--expert", "2",
         "--collective-timeout", "5"], capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - started < 60 + 15  # S = 5 s, 60 s allowed, start-up beside it
    assert result.returncode != 0
    if fault == "stall":  # rank 0 waited the timeout, then named what it was doing
        lines = [line for line in result.stderr.splitlines() if "rank 0 of 2:" in line]
        assert lines and "failed, another rank failed or stalled" in lines[0], result.stderr
        assert "all-to-all" in lines[0] or "all-reduce" in lines[0]
    from moekit.model import load_model
    load_model(tmp_path / "run" / "checkpoints" / "step-000004")  # the last one, intact


@pytest.mark.parametrize("processes, expert", [(2, 2), (4, 2)])
def test_deterministic_runs_repeat_bit_for_bit(tmp_path, processes, expert):
    (tmp_path / "run.toml").write_text(CONFIG.replace("steps = 4", "steps = 2"))
    for name in ("first", "second"):
        result = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                         str(tmp_path / name), "--quiet", "--nproc", str(processes), "--expert",
                         str(expert), "--deterministic")
        assert result.returncode == 0, result.stderr
    assert _records(tmp_path / "first") == _records(tmp_path / "second")
    _assert_same_checkpoints(tmp_path / "first", tmp_path / "second", "step-000002")


def test_zero_1_trains_the_data_parallel_run_and_its_checkpoint_resumes_anywhere(tmp_path):
    """ZeRO-1 (optimizer state sharded over the ranks) makes the same updates as plain data
    parallelism, bit for bit, and writes the whole optimizer state."""
    (tmp_path / "run.toml").write_text(CONFIG)
    for name, flags in (("plain", []), ("zero", ["--zero", "1"])):
        result = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out",
                         str(tmp_path / name), "--quiet", "--nproc", "2", *flags)
        assert result.returncode == 0, result.stderr
    assert _records(tmp_path / "zero") == _records(tmp_path / "plain")
    _assert_same_checkpoints(tmp_path / "plain", tmp_path / "zero", "step-000004")
    # ZeRO-1's step-2 checkpoint resumed with ZeRO-1 again ends where the plain run ended.
    shutil.copytree(tmp_path / "zero", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-000004")
    resumed = _moekit("train", "--out", str(tmp_path / "again"), "--resume", "--quiet",
                      "--nproc", "2", "--zero", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert _records(tmp_path / "again") == _records(tmp_path / "plain")
