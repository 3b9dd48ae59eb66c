"""`moekit train/generate/eval` from the command line: results, and bad input as one line,
exit code 2, nothing overwritten."""
import pytest

from moekit.cli import main
from test_train import CONFIG_TOML


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "run.toml").write_text(CONFIG_TOML)
    assert main(["train", "--config", str(folder / "run.toml"), "--out", str(folder / "run"),
                 "--steps", "4", "--quiet", "--device", "cpu"]) == 0
    return folder


def _fails(capsys, argv, *fragments):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_train_generate_eval(trained, capsys):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(trained / "run"), "--prompt", "The if",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("The if")
    assert main(["generate", "--checkpoint", str(trained / "run"), "--prompt", "The if",
                 "--max-new-tokens", "5", "--temperature", "0", "--packed"]) == 0
    assert capsys.readouterr().out == plain  # the packed weights' greedy tokens
    assert main(["eval", "--checkpoint", str(trained / "run")]) == 0
    out = capsys.readouterr().out
    # eval of the final checkpoint repeats the run's last validation loss exactly
    import json
    last = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text()
            .splitlines()][-1]
    assert last["kind"] == "eval" and f"loss {last['val_loss']:.4f}" in out


def test_bad_training_input(trained, tmp_path, capsys):
    run = str(trained / "run")
    before = (trained / "run" / "metrics.jsonl").read_bytes()
    _fails(capsys, ["train", "--out", run], "exists and is not empty", "--resume")
    _fails(capsys, ["train", "--out", run, "--resume", "--lr", "0.1"], "drop --lr")
    assert (trained / "run" / "metrics.jsonl").read_bytes() == before  # nothing overwritten
    out = str(tmp_path / "new")
    _fails(capsys, ["train", "--out", out, "--lr", "-1"], "lr=-1.0 is not allowed")
    _fails(capsys, ["train", "--out", out, "--batch-size", "0"], "batch_size=0")
    _fails(capsys, ["train", "--out", out, "--preset", "huge"], "invalid choice: 'huge'")
    _fails(capsys, ["train", "--out", out, "--seq-len", "1000"], "longer than the model's context")
    _fails(capsys, ["train", "--out", out, "--corpus", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    _fails(capsys, ["train", "--out", out, "--corpus", str(tmp_path / "empty.txt")], "is empty")
    _fails(capsys, ["train", "--out", out, "--config", str(tmp_path / "x.ini")], ".toml")
    assert not (tmp_path / "new").exists()


def test_bad_checkpoints(trained, tmp_path, capsys):
    _fails(capsys, ["generate", "--checkpoint", str(tmp_path), "--prompt", "x"],
           "not a checkpoint")
    _fails(capsys, ["generate", "--checkpoint", str(trained / "run"), "--prompt", "x",
                    "--max-new-tokens", "100"], "exceeds the model context (64)")
    _fails(capsys, ["generate", "--checkpoint", str(trained / "run"), "--prompt", "x",
                    "--packed", "--expert-memory", "1MB"], "--packed does not go with")
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(trained / "run" / "checkpoints" / "step-000004", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _fails(capsys, ["eval", "--checkpoint", str(broken)], "model.safetensors: not a readable")
    # a checkpoint of another architecture: config and weights disagree
    config = (broken / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    shutil.copy(trained / "run" / "checkpoints" / "step-000004" / "model.safetensors", weights)
    (broken / "config.json").write_text(config)
    _fails(capsys, ["generate", "--checkpoint", str(broken), "--prompt", "x"],
           "does not fit the model of config.json")


def test_upcycle_a_run_then_continue_training(trained, tmp_path, capsys):
    """The whole path a user takes: a run folder -> `moekit upcycle` -> `moekit train
    --init-from` -> `moekit generate`; the upcycled model starts at the run's logits."""
    import torch

    from moekit.model import load_model
    from moekit.train.checkpoint import resolve_checkpoint
    dense_run = tmp_path / "dense"
    assert main(["train", "--config", str(trained / "run.toml"), "--dense", "--steps", "2",
                 "--out", str(dense_run), "--quiet", "--device", "cpu"]) == 0
    assert main(["upcycle", "--from", str(dense_run), "--experts", "4", "--top-k", "2",
                 "--out", str(tmp_path / "moe")]) == 0
    ids = torch.randint(0, 300, (2, 12))
    dense, moe = load_model(resolve_checkpoint(dense_run)), load_model(tmp_path / "moe")
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["train", "--init-from", str(tmp_path / "moe"), "--out", str(tmp_path / "tuned"),
                 "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
                 "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "tuned"), "--prompt", "def",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def")
