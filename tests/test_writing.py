"""Where commands may write: every output option of every command (found in argparse, so that a
new command is covered without editing this file) refuses an existing file, an existing
non-empty folder, its own input and a path inside it, with one line and exit code 2, touching
nothing; a folder another process writes is refused naming it; files.check_output's rule for
file options; a full disk during a checkpoint leaves the previous one intact."""
import errno
import hashlib
import os
from pathlib import Path

import pytest

from moekit.cli import build_parser, main
from moekit.cli.paths import command_parsers
from moekit.files import check_output, lock_folder


def _outputs():
    for name, command in command_parsers(build_parser()).items():
        for action in command._actions:
            if hasattr(action, "writes"):
                yield name, command, action


OUTPUTS = list(_outputs())


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _fake_run(folder: Path) -> Path:
    """Files laid out as a run folder (the check comes before anything is read)."""
    (folder / "checkpoints" / "step-000001").mkdir(parents=True)
    for name in ("run.json", "metrics.jsonl", "checkpoints/step-000001/config.json"):
        (folder / name).write_text(f"{name}\n")
    return folder


def _argv(name, command, output, target, source) -> list[str]:
    """The command with ``target`` as ``output``, ``source`` for its inputs (the required ones,
    or the first), and any value argparse accepts for its other required options."""
    argv = [name, output.option_strings[0], str(target)]
    inputs = [a for a in command._actions if getattr(a, "reads", False)]
    for action in command._actions:
        if action in inputs and (action.required or action is inputs[0]):
            argv += [action.option_strings[0], str(source)]
        elif action.required and action is not output:
            argv += [action.option_strings[0],
                     str(list(action.choices)[0]) if action.choices else "2"]
    return argv


def test_the_commands_that_write_declare_their_outputs():
    assert {name for name, _, _ in OUTPUTS} >= {"train", "upcycle", "import", "export",
                                                 "quantize"}
    for name, command in command_parsers(build_parser()).items():
        for action in command._actions:
            if any(flag.startswith("--out") or flag.endswith(("-file", "-dir", "-log"))
                   for flag in action.option_strings):
                assert hasattr(action, "writes"), f"moekit {name} {action.option_strings[0]}"


@pytest.mark.parametrize("case", ["existing file", "non-empty folder", "the input",
                                  "inside the input"])
@pytest.mark.parametrize("name, command, output", OUTPUTS,
                         ids=[f"{n}-{a.option_strings[0]}" for n, _, a in OUTPUTS])
def test_an_output_is_refused_and_nothing_changes(name, command, output, case, tmp_path,
                                                  capsys):
    source = _fake_run(tmp_path / "run")
    (tmp_path / "file.txt").write_text("keep me\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("keep me\n")
    target = {"existing file": tmp_path / "file.txt", "non-empty folder": tmp_path / "other",
              "the input": source, "inside the input": source / "sub"}[case]
    if output.writes == "file" and case == "existing file":
        target = tmp_path / "other"  # a file option is refused a folder; a file needs --overwrite
    before = _tree_hash(tmp_path)
    assert main(_argv(name, command, output, target, source)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(target) in err, err
    if case.endswith("input"):
        assert "the input" in err and str(source) in err
    assert _tree_hash(tmp_path) == before


def test_file_outputs(tmp_path):
    (tmp_path / "log.txt").write_text("old\n")
    with pytest.raises(ValueError, match="exists and is not empty: pass --overwrite"):
        check_output(tmp_path / "log.txt", [], overwrite=False, option="--log", kind="file")
    check_output(tmp_path / "log.txt", [], overwrite=True, option="--log", kind="file")
    check_output(tmp_path / "new.txt", [], overwrite=False, option="--log", kind="file")
    with pytest.raises(ValueError, match="is not a file"):
        check_output(tmp_path, [], overwrite=True, option="--log", kind="file")
    with pytest.raises(ValueError, match="is inside the input --from"):
        check_output(tmp_path / "log.txt", [("--from", tmp_path)], overwrite=True, kind="file")


def test_a_folder_another_process_writes_is_refused_naming_it(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    with lock_folder(run):
        before = _tree_hash(tmp_path)
        for argv in (["train", "--out", str(run), "--resume"],
                     ["train", "--out", str(run), "--overwrite"],
                     ["quantize", "--checkpoint", str(tmp_path / "x"), "--out", str(run),
                      "--overwrite", "--dtype", "fp8"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"is being written by process {os.getpid()}" in err and err.count("\n") == 1
        assert _tree_hash(tmp_path) == before


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    from test_train import CONFIG_TOML
    (tmp_path / "run.toml").write_text(CONFIG_TOML)
    run = tmp_path / "run"
    real_save_file, hashes = safetensors.torch.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).name == "optimizer.safetensors" and ".step-000006.tmp-" in str(path):
            hashes.append(_tree_hash(run / "checkpoints" / "step-000003"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--out", str(run),
                 "--steps", "6", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device" in err, err
    assert "step-000003" in err and "--resume" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    assert hashes == [_tree_hash(run / "checkpoints" / "step-000003")]


def test_overwrite_swaps_the_new_output_in(tmp_path):
    from dataclasses import replace

    from moekit.train.loop import train
    from test_resume import BASE_MODEL, BASE_TRAIN
    from test_train import SMALL_DATA
    old = _fake_run(tmp_path / "run")
    (old / "old-notes.txt").write_text("replaced\n")
    with pytest.raises(ValueError, match="exists and is not empty.*--resume"):
        train(BASE_MODEL, BASE_TRAIN, SMALL_DATA, old, show_progress=False)
    train(BASE_MODEL, replace(BASE_TRAIN, steps=1), SMALL_DATA, old, overwrite=True,
          show_progress=False)
    assert not (old / "old-notes.txt").exists() and (old / "checkpoints" / "step-000001").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it


def test_tensors_appended_to_a_safetensors_file_read_back_with_the_others(tmp_path):
    """``append_to_safetensors`` (what completes a checkpoint written with DCP) gives the file
    ``safetensors`` itself writes for all the tensors together, whatever their dtypes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from moekit.files import append_to_safetensors
    first = {"w": torch.randn(3, 5, dtype=torch.float64), "v": torch.randn(7)}  # odd bytes
    added = {"step": torch.tensor(4.0), "count": torch.tensor(9), "rng": torch.get_rng_state()}
    save_file(first, str(tmp_path / "model.safetensors"))
    append_to_safetensors(tmp_path / "model.safetensors", added, {"format": "pt"})
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == first.keys() | added.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype
               for k, v in {**first, **added}.items())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # nothing left beside
