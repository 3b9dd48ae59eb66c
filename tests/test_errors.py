"""Bad input: a ValueError that names the bad value and what is allowed, before any kernel."""
import pytest
import torch

from moekit import MoEConfig, MoELayer

BASE = dict(hidden_size=16, ffn_size=8, num_experts=4, top_k=2)


@pytest.mark.parametrize("change, words", [
    (dict(top_k=5), ["top_k=5", "num_experts (4)"]),
    (dict(top_k=0), ["top_k=0", "positive integer"]),
    (dict(num_experts=-1), ["num_experts=-1", "positive integer"]),
    (dict(capacity_factor=0), ["capacity_factor=0", "> 0"]),
    (dict(capacity_factor=-1.5), ["capacity_factor=-1.5", "> 0"]),
    (dict(eval_capacity_factor=float("nan")), ["eval_capacity_factor=nan"]),
    (dict(router="hash"), ["router='hash'", "softmax, switch, sigmoid"]),
    (dict(activation="tanh"), ["activation='tanh'", "swiglu, geglu, gelu, relu"]),
    (dict(overflow="reroute"), ["overflow='reroute'", "drop, recycle_random"]),
    (dict(aux_loss="l2"), ["aux_loss='l2'", "switch, skywork, none"]),
    (dict(router="switch"), ["top_k=2", "exactly 1 expert"]),
    (dict(logit_norm_scale=0), ["logit_norm_scale=0"]),
    (dict(jitter=1.5), ["jitter=1.5"]),
    (dict(aux_loss_coef=-0.1), ["aux_loss_coef=-0.1", ">= 0"]),
    (dict(adaptive_beta=1.0), ["adaptive_beta=1.0", "[0, 1)"]),
    (dict(hidden_size=16.0), ["hidden_size=16.0", "positive integer"]),
])
def test_bad_config_names_value_and_allowed(change, words):
    with pytest.raises(ValueError) as error:
        MoEConfig(**{**BASE, **change})
    for word in words:
        assert word in str(error.value)


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown MoE config keys \\['experts'\\]"):
        MoEConfig.from_dict({**BASE, "experts": 3})


@pytest.fixture
def layer():
    return MoELayer(MoEConfig(**BASE))


def test_wrong_hidden_size(layer):
    with pytest.raises(ValueError, match=r"shape \(3, 12\).*hidden_size=16"):
        layer(torch.randn(3, 12))


def test_non_floating_input(layer):
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        layer(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="floating-point tensor, got list"):
        layer([[0.0] * 16])


def test_bad_mask(layer):
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3\)"):
        layer(torch.randn(2, 3, 16), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"got torch.bool \(3, 2\)"):
        layer(torch.randn(2, 3, 16), torch.ones(3, 2, dtype=torch.bool))


def test_router_and_experts_must_agree_with_config():
    from moekit import GroupedExperts
    with pytest.raises(ValueError, match="experts has num_experts=3, the config num_experts=4"):
        MoELayer(MoEConfig(**BASE), experts=GroupedExperts(3, 16, 8))


def test_cli_version_and_unknown_command(capsys):
    from moekit import __version__
    from moekit.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, text", [
    (".json", '{"hidden_size": 8, "moe": {"top_k": 1}}'),
    (".toml", 'hidden_size = 8\n[moe]\ntop_k = 1\n'),
    (".yaml", 'hidden_size: 8\nmoe:\n  top_k: 1\n')])
def test_config_files(tmp_path, suffix, text):
    from moekit.config import read_config_file
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert read_config_file(path) == {"hidden_size": 8, "moe": {"top_k": 1}}
    path.write_text("{" + text)
    with pytest.raises(ValueError, match=f"run{suffix}' is not valid {suffix[1:].upper()}"):
        read_config_file(path)


def test_config_file_bad_names(tmp_path):
    from moekit.config import read_config_file
    with pytest.raises(ValueError, match="expected a .json, .toml, .yaml or .yml file"):
        read_config_file(tmp_path / "run.ini")
    with pytest.raises(ValueError, match="cannot be read: No such file"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a mapping of keys to values, got list"):
        read_config_file(tmp_path / "list.json")
