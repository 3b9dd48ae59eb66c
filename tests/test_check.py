"""`moekit check`: the equivalence matrix on a user's configuration, from the command line."""
import pytest

from moekit.cli import main
from moekit.config import preset
from moekit.parallel.mesh import Mesh
from moekit.train.equivalence import shrink


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a table row per line


def test_check_passes_on_the_tiny_preset(capsys):
    assert main(["check", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "data parallel 2" in out and "FAIL" not in out and out.count("pass") == 10
    assert "needs 4 processes" in out  # data parallel 4 is listed as skipped


def test_check_fails_when_a_layout_is_wrong(capsys, monkeypatch):
    # Ranks that forget to sum their shares: the data-parallel rows must fail, the others not.
    monkeypatch.setattr(Mesh, "sum_", lambda self, tensor, group=None: tensor)
    assert main(["check", "--nproc", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 4 and out.count("pass") == 6


def test_shrinking_keeps_routing_and_grouped_attention():
    config, changes = shrink(preset("hunyuan-large-389b"))
    assert (config.num_heads, config.kv_heads) == (4, 1) and config.cla_share == 2
    assert (config.moe.num_experts, config.moe.top_k, config.moe.num_shared_experts) == (16, 1, 1)
    assert any("num_layers 64 -> 4" in change for change in changes)


@pytest.mark.parametrize("argv, message", [
    (["check", "--nproc", "0"], "--nproc: 0 is not allowed"),
    (["check", "--preset", "nope"], "invalid choice: 'nope'"),
    (["train", "--lb-scope", "batch"], "invalid choice: 'batch'"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_config_without_a_model_is_refused(tmp_path, capsys):
    (tmp_path / "train.toml").write_text("[train]\nsteps = 3\n")
    assert main(["check", "--config", str(tmp_path / "train.toml")]) == 2
    err = capsys.readouterr().err
    assert "holds no model configuration" in err and len(err.strip().splitlines()) == 1
