"""Training: exact resume (after Ctrl-C and after kill -9), accumulation, schedule, groups."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moekit.config import DataConfig, ModelConfig, MoEConfig, TrainConfig
from moekit.model import Transformer
from moekit.train.loop import train
from moekit.train.optim import build_optimizer, learning_rate, set_learning_rate

SMALL_MODEL = ModelConfig(
    vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=64,
    moe=MoEConfig(hidden_size=32, ffn_size=32, num_experts=4, top_k=2, capacity_factor=1.0,
                  overflow="recycle_random", adaptive_aux=True, jitter=0.01))
SMALL_TRAIN = TrainConfig(steps=12, batch_size=4, seq_len=32, warmup_steps=3, eval_every=4,
                          eval_batches=2, checkpoint_every=3, keep_checkpoints=2)
SMALL_DATA = DataConfig(vocab_size=300)
CONFIG_TOML = """
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
capacity_factor = 1.0
overflow = "recycle_random"
adaptive_aux = true
jitter = 0.01
[train]
steps = 12
batch_size = 4
seq_len = 32
warmup_steps = 3
eval_every = 4
eval_batches = 2
checkpoint_every = 3
[data]
vocab_size = 300
"""


def _losses(run: Path) -> list[tuple]:
    """Everything a run logged except timings, in order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timings = {"tokens_per_s", "model_flops_per_s", "mfu"}
    return [tuple((k, v) for k, v in sorted(r.items()) if k not in timings) for r in records]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "reference"
    train(SMALL_MODEL, SMALL_TRAIN, SMALL_DATA, run, show_progress=False)
    return run


def test_run_folder(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {"run.json", "tokenizer.json", "metrics.jsonl", "plots", "checkpoints"} <= names
    record = json.loads((reference_run / "run.json").read_text())
    assert record["train"]["steps"] == 12 and record["versions"]["torch"] == torch.__version__
    # keep_checkpoints=2: steps 9 and 12 remain of 3, 6, 9, 12
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == [
        "step-000009", "step-000012"]
    assert {p.name for p in (reference_run / "plots").iterdir()} == {
        "loss.png", "drop_rate.png", "expert_load.png", "load_layer_0.png", "load_layer_1.png",
        "router_ratios.png", "imbalance.png"}  # expert_similarity.png from step 50 on
    assert len(_losses(reference_run)) == 12 + 3  # 12 steps, validations at 4, 8, 12


def test_training_learns(reference_run):
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text()
               .splitlines()]
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert evals[-1] < evals[0] < math.log(300) + 0.5


def test_same_seed_same_run(reference_run, tmp_path):
    train(SMALL_MODEL, SMALL_TRAIN, SMALL_DATA, tmp_path / "again", show_progress=False)
    assert _losses(tmp_path / "again") == _losses(reference_run)


def test_ctrl_c_then_resume_is_exact(reference_run, tmp_path):
    """SIGINT after step 5: the step finishes, a checkpoint of step 5 is written, the run stops;
    resuming gives exactly the reference run's metrics."""
    def interrupt(record):
        if record["step"] == 5:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="stopped after step 5"):
        train(SMALL_MODEL, SMALL_TRAIN, SMALL_DATA, tmp_path / "run", show_progress=False,
              on_step=interrupt)
    assert (tmp_path / "run" / "checkpoints" / "step-000005").is_dir()
    train(None, None, None, tmp_path / "run", resume=True, show_progress=False)
    assert _losses(tmp_path / "run") == _losses(reference_run)


def _moekit(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "moekit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_at_a_random_step_then_resume_is_exact(reference_run, tmp_path):
    """kill -9 at a random step of a `moekit train` process; `--resume` repeats the steps after
    its last checkpoint and ends with exactly the reference run's metrics."""
    (tmp_path / "run.toml").write_text(CONFIG_TOML)
    kill_after = random.randint(4, 11)
    run = tmp_path / "run"
    process = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(run),
                      "--quiet", "--device", "cpu")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"train"' in line for line in lines) >= kill_after:
            break
        time.sleep(0.01)
    process.kill()
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(run),
                              "--resume", "--quiet", "--device", "cpu"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run) == _losses(reference_run), f"killed after step {kill_after}"


def test_ctrl_c_of_the_cli(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG_TOML)
    run = tmp_path / "run"
    process = _moekit("train", "--config", str(tmp_path / "run.toml"), "--out", str(run),
                      "--quiet", "--steps", "1000", "--device", "cpu")
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    assert list((run / "checkpoints").iterdir())


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    """Dropless, no aux loss: cross-entropy is a sum over the step's tokens divided by their
    count, so 4 micro-batches of 1 give the update of one batch of 4."""
    model_config = replace(SMALL_MODEL, moe=replace(SMALL_MODEL.moe, capacity_factor=None,
                                                    aux_loss="none", jitter=0.0))
    runs = []
    for accum in (1, 4):
        config = replace(SMALL_TRAIN, steps=3, grad_accum=accum, eval_every=3,
                         checkpoint_every=3)
        train(model_config, config, SMALL_DATA, tmp_path / f"accum{accum}", show_progress=False)
        runs.append(tmp_path / f"accum{accum}")
    from moekit.model import load_model
    one, four = (load_model(run / "checkpoints" / "step-000003") for run in runs)
    for (name, a), b in zip(one.state_dict().items(), four.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text()
               .splitlines() if '"train"' in line] for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_autocast_trains(tmp_path):
    config = replace(SMALL_TRAIN, steps=2, precision="bf16", eval_every=2, checkpoint_every=2)
    result = train(SMALL_MODEL, config, SMALL_DATA, tmp_path / "bf16", show_progress=False)
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)


def test_schedule_by_hand():
    config = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert learning_rate(0, config) == 0.5 and learning_rate(1, config) == 1.0
    assert learning_rate(2, config) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(10, config) == pytest.approx(0.1)  # and ends at lr * min_lr_ratio
    # halfway through the cosine (step 6 of 2..10): 0.1 + 0.9 * 0.5
    assert learning_rate(6, config) == pytest.approx(0.55)


@pytest.mark.parametrize("rule, routed_scale", [("sqrt_tokens", math.sqrt(2 / 8)),
                                                ("same", 1.0)])
def test_expert_learning_rates(rule, routed_scale):
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
                         moe=MoEConfig(hidden_size=16, ffn_size=8, num_experts=8, top_k=2,
                                       num_shared_experts=1, shared_expert_gate=True))
    model = Transformer(config)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=0,
                                                   expert_lr_rule=rule))
    set_learning_rate(optimizer, 0, TrainConfig(lr=1e-3, warmup_steps=0))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups
             for p in group["params"]}
    ffn = model.layers[0].ffn
    assert rate[id(ffn.experts.gate_up_proj)] == pytest.approx(1e-3 * routed_scale)
    assert rate[id(ffn.experts.down_proj)] == pytest.approx(1e-3 * routed_scale)
    for parameter in (ffn.router.weight, ffn.shared_experts.up_proj.weight,
                      ffn.shared_gate.weight, model.layers[0].attn.q_proj.weight,
                      model.embed_tokens.weight):
        assert rate[id(parameter)] == 1e-3
    assert decay[id(model.norm.weight)] == 0.0 and decay[id(ffn.router.weight)] == 0.1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        list(model.parameters()))


def test_checkpoints_are_model_folders(reference_run):
    from moekit.model import load_model
    from moekit.train.checkpoint import resolve_checkpoint
    folder = resolve_checkpoint(reference_run)
    assert folder.name == "step-000012"
    model = load_model(folder)
    assert model.config.vocab_size == 300 and os.path.isfile(folder / "tokenizer.json")


def test_init_from_a_model_folder(reference_run, tmp_path):
    """A run started from a checkpoint uses its model, weights and tokenizer: after one step
    at a learning rate of 1e-12 its validation loss is the checkpoint's."""
    from moekit.model import load_model
    from moekit.train.checkpoint import resolve_checkpoint
    start = resolve_checkpoint(reference_run)
    config = replace(SMALL_TRAIN, steps=1, lr=1e-12, warmup_steps=0, eval_every=1)
    result = train(None, config, SMALL_DATA, tmp_path / "tuned", init_from=start,
                   show_progress=False)
    reference_val = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text()
                     .splitlines()][-1]["val_loss"]
    assert result.val_loss == pytest.approx(reference_val, abs=1e-4)
    assert (tmp_path / "tuned" / "tokenizer.json").read_bytes() == (
        start / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match="init_from brings its own model"):
        train(SMALL_MODEL, config, SMALL_DATA, tmp_path / "other", init_from=start)
    assert load_model(result.checkpoint).config == load_model(start).config


def _rewrite_as_format_1(folder: Path) -> None:
    """Turn a checkpoint into what moekit wrote before format_version 2: stacked expert weights
    (and their optimizer moments) input-major, [E, in, out]."""
    from safetensors.torch import load_file, save_file
    for name in ("model.safetensors", "optimizer.safetensors"):
        tensors = load_file(folder / name)
        save_file({key: value.transpose(1, 2).contiguous()
                   if value.dim() == 3 else value
                   for key, value in tensors.items()}, folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 1}))


def test_a_run_written_before_format_2_resumes_exactly(reference_run, tmp_path):
    import shutil
    run = tmp_path / "old"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000012")
    _rewrite_as_format_1(run / "checkpoints" / "step-000009")
    train(None, None, None, run, resume=True, show_progress=False)
    assert _losses(run) == _losses(reference_run)


def _final_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    from moekit.train.checkpoint import latest_checkpoint
    return load_file(latest_checkpoint(run) / "model.safetensors")


def _assert_weights_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_fused_foreach_and_loop_adamw_train_alike(tmp_path):
    config = replace(SMALL_TRAIN, steps=3)
    weights = {}
    for impl in ("fused", "foreach", "loop"):
        run = tmp_path / impl
        train(SMALL_MODEL, replace(config, optimizer_impl=impl), SMALL_DATA, run,
              show_progress=False)
        assert json.loads((run / "run.json").read_text())["optimizer_impl"] == impl
        weights[impl] = _final_weights(run)
    _assert_weights_close(weights["fused"], weights["loop"])
    _assert_weights_close(weights["foreach"], weights["loop"])
    auto = train(SMALL_MODEL, replace(config, steps=1), SMALL_DATA, tmp_path / "auto",
                 show_progress=False).run
    assert json.loads((auto / "run.json").read_text())["optimizer_impl"] == "fused"  # on a CPU


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_clipped_step_is_clip_grad_norm_then_adamw(impl):
    # Fused AdamW takes the clip factor as its grad_scale; the others get scaled gradients.
    import copy
    from moekit.parallel.mesh import Mesh
    from moekit.train.optim import clipped_step
    torch.manual_seed(0)
    model = Transformer(SMALL_MODEL)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, replace(SMALL_TRAIN, optimizer_impl=impl, weight_decay=0.0,
                                                expert_lr_rule="same"))
    expected = torch.optim.AdamW(reference.parameters(), lr=SMALL_TRAIN.lr, foreach=False,
                                 betas=(SMALL_TRAIN.beta1, SMALL_TRAIN.beta2), weight_decay=0.0)
    for max_norm in (1e-3, math.inf, 1e9):  # clipped (the norm is about 0.03), never, under
        ids = torch.randint(0, SMALL_MODEL.vocab_size, (2, 16))
        for module in (model, reference):
            torch.manual_seed(1)  # the same router jitter
            module(ids).logits.square().mean().backward()
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, foreach=False)
        expected.step()
        expected.zero_grad()
        got = clipped_step(optimizer, model, max_norm, Mesh())
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
        assert all(p.grad is None for p in model.parameters())
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(model.get_parameter(name), parameter, rtol=0, atol=1e-6,
                                       msg=name)
            # AdamW's update hardly depends on a constant gradient scale; its moments do.
            torch.testing.assert_close(
                optimizer.state[model.get_parameter(name)]["exp_avg"],
                expected.state[parameter]["exp_avg"], rtol=1e-5, atol=1e-9, msg=name)
    assert not hasattr(optimizer, "grad_scale")


def test_gradient_norm_sums_every_kind_of_gradient_once():
    # Large fp32 gradients take BLAS's dot, small ones and other dtypes one foreach call, a
    # strided one the foreach call too: the norm is the float64 hand computation's.
    from moekit.parallel.mesh import Mesh
    from moekit.parallel.parallelize import DOT_FROM_ELEMENTS, gradient_norm
    torch.manual_seed(0)
    shapes = [((DOT_FROM_ELEMENTS // 64, 64), torch.float32), ((8, 8, 16), torch.float32),
              ((DOT_FROM_ELEMENTS // 32, 64), torch.float32), ((5,), torch.float32),
              ((300, 7), torch.bfloat16), ((3, 3), torch.float64)]
    model = torch.nn.Module()
    for index, (shape, dtype) in enumerate(shapes):
        model.register_parameter(f"p{index}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))
        model.get_parameter(f"p{index}").grad = torch.randn(shape).to(dtype)
    model.p2.grad = torch.randn(64, DOT_FROM_ELEMENTS // 32).t()  # strided: a dot would copy it
    model.register_parameter("frozen", torch.nn.Parameter(torch.ones(4)))  # no gradient
    want = sum(p.grad.double().square().sum() for p in model.parameters()
               if p.grad is not None).sqrt()
    torch.testing.assert_close(gradient_norm(model, Mesh()), want, rtol=1e-6, atol=0)


def test_a_checkpoint_of_one_adamw_resumes_with_another(tmp_path):
    config = replace(SMALL_TRAIN, steps=6, checkpoint_every=3, optimizer_impl="fused")
    train(SMALL_MODEL, config, SMALL_DATA, tmp_path / "whole", show_progress=False)

    def switch_to_loop(record):
        if record["step"] == 3:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(SMALL_MODEL, config, SMALL_DATA, tmp_path / "cut", show_progress=False,
              on_step=switch_to_loop)
    run_file = tmp_path / "cut" / "run.json"
    record = json.loads(run_file.read_text())
    record["train"]["optimizer_impl"] = "loop"
    run_file.write_text(json.dumps(record))
    train(None, None, None, tmp_path / "cut", resume=True, show_progress=False)
    # The loop's moments were the fused kernel's, by name: the rest differs by rounding only.
    _assert_weights_close(_final_weights(tmp_path / "cut"), _final_weights(tmp_path / "whole"))


def test_each_step_logs_router_health_of_its_whole_batch():
    # The step's health keys are those of one forward over its global batch (sums over the
    # micro-batches over the batch's tokens; the sums are float32, as the layer keeps them).
    import copy

    from moekit.parallel.mesh import Mesh
    from moekit.train.equivalence import GradientRecorder
    from moekit.train.step import train_step
    config = replace(SMALL_MODEL, moe=replace(SMALL_MODEL.moe, capacity_factor=None,
                                              jitter=0.0))
    torch.manual_seed(0)
    model = Transformer(config).double().train()
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stats = reference(tokens[:, :-1]).moe_stats
    record = train_step(model, GradientRecorder(model.named_parameters()), tokens[:, :-1],
                        tokens[:, 1:], replace(SMALL_TRAIN, batch_size=4, grad_accum=2), Mesh())
    for layer, s in enumerate(stats):
        load = s.tokens_per_expert_E.double()
        assert record["tokens_per_expert"][layer] == s.tokens_per_expert_E.tolist()
        assert record["load_cv"][layer] == pytest.approx(float(load.std(correction=0) / load.mean()))
        assert record["load_max_over_mean"][layer] == pytest.approx(float(load.max() / load.mean()))
        assert record["router_entropy"][layer] == pytest.approx(s.router_entropy, rel=1e-6)
        assert record["max1_over_max2"][layer] == pytest.approx(s.max1_over_max2, rel=1e-6)
        assert record["max2_over_max3"][layer] == pytest.approx(s.max2_over_max3, rel=1e-6)
