"""Resuming and extending a run without losing anything: metrics survive a kill -9 in the first
moments of a resumed run, what killed writes left is cleared on the next start, and
`--resume --steps N` extends a run with a constant learning-rate tail, the same whether or not
it is killed on the way."""
import random
import shutil
import signal
import time
from dataclasses import replace

import pytest

from moekit.config import ModelConfig, TrainConfig
from moekit.train.loop import read_run, train
from moekit.train.optim import extend_schedule, learning_rate
from test_train import SMALL_DATA, SMALL_MODEL, SMALL_TRAIN, _losses, _moekit

# 30 steps of a one-layer MoE on 8-token sequences, checkpoints every 4: seconds per run.
BASE_MODEL = ModelConfig(
    vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32, max_seq_len=64,
    moe=replace(SMALL_MODEL.moe, hidden_size=16, ffn_size=16))
BASE_TRAIN = replace(SMALL_TRAIN, steps=30, batch_size=1, seq_len=8, eval_every=10,
                     eval_batches=1, checkpoint_every=4)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    train(BASE_MODEL, BASE_TRAIN, SMALL_DATA, run, show_progress=False)
    return run


def _kill_when(process, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the process ended before the kill"


def test_kill_in_the_first_moments_of_a_resumed_run_keeps_every_record(base_run, tmp_path):
    """Stopped at step 26, resumed, kill -9 as soon as the resumed process touches
    metrics.jsonl (today's code had just emptied it), resumed again: every record of the
    uninterrupted run is there, bit for bit."""
    def interrupt(record):
        if record["step"] == 26:
            signal.raise_signal(signal.SIGINT)

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(BASE_MODEL, BASE_TRAIN, SMALL_DATA, run, show_progress=False, on_step=interrupt)
    metrics = run / "metrics.jsonl"
    before = metrics.stat()
    process = _moekit("train", "--out", str(run), "--resume", "--quiet", "--device", "cpu")

    def touched():
        now = metrics.stat() if metrics.exists() else None
        return now is None or (now.st_ino, now.st_size) != (before.st_ino, before.st_size)

    _kill_when(process, touched)
    assert _losses(run) == _losses(base_run)[:28]  # 26 steps and 2 validations
    train(None, None, None, run, resume=True, show_progress=False)
    assert _losses(run) == _losses(base_run)


def test_leftovers_of_killed_writes_are_cleared_on_the_next_start(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    checkpoints = run / "checkpoints"
    (checkpoints / ".step-000031.tmp-a1b2").mkdir()  # a checkpoint write killed half-way
    (checkpoints / ".step-000031.tmp-a1b2" / "model.safetensors").write_bytes(b"half")
    (run / ".metrics.jsonl.tmp-c3d4").write_text("half\n")
    (tmp_path / ".run.tmp-e5f6").mkdir()  # a killed `train --overwrite` of this run
    # killed between atomic_directory's two renames: the old version is the only one
    (checkpoints / "step-000028").rename(checkpoints / ".step-000028.old-4242")
    (tmp_path / ".other.tmp-1").mkdir()  # another output's: not this run's to clear
    (checkpoints / "notes.tmp").write_text("the user's\n")
    train(None, None, None, run, resume=True, show_progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes.tmp", "step-000028",
                                                              "step-000030"]
    assert not list(run.glob(".*.tmp-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "run"]


def test_extension_keeps_the_cosine_and_adds_a_constant_tail():
    config = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    extended = extend_schedule(config, 20)
    assert [learning_rate(s, extended) for s in range(11)] == [learning_rate(s, config)
                                                               for s in range(11)]
    assert [learning_rate(s, extended) for s in range(11, 20)] == [pytest.approx(0.1)] * 9
    assert extend_schedule(extended, 30).schedule_steps == 11  # twice = once
    assert extend_schedule(config, 11) == config
    with pytest.raises(ValueError, match="--steps 5 is not allowed.*>= 11"):
        extend_schedule(config, 5)


def test_extending_a_run_killed_on_the_way_equals_the_uninterrupted_extension(base_run,
                                                                              tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    shutil.copytree(base_run, uninterrupted)
    shutil.copytree(base_run, killed)
    train(None, None, None, uninterrupted, resume=True, steps=40, show_progress=False)
    records = [dict(r) for r in _losses(uninterrupted)]
    floor = BASE_TRAIN.lr * BASE_TRAIN.min_lr_ratio
    rates = [r["lr"] for r in records if r["kind"] == "train"]
    assert rates[:30] == [learning_rate(s, BASE_TRAIN) for s in range(30)]
    assert rates[30:] == [pytest.approx(floor)] * 10
    assert _losses(uninterrupted)[:33] == _losses(base_run)  # 30 steps + 3 validations kept

    kill_after = random.randint(32, 38)
    process = _moekit("train", "--out", str(killed), "--resume", "--steps", "40", "--quiet",
                      "--device", "cpu")
    metrics = killed / "metrics.jsonl"
    _kill_when(process, lambda: metrics.read_text().count('"train"') >= kill_after)
    train(None, None, None, killed, resume=True, show_progress=False)  # run.json says 40
    assert read_run(killed)[1].steps == 40
    assert _losses(killed) == _losses(uninterrupted), f"killed after step {kill_after}"
