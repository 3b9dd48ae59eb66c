"""Model folders: a round trip is exact, bad folders are named errors, writes are atomic."""
from dataclasses import replace

import pytest
import torch

from moekit.config import preset
from moekit.files import CheckpointError, atomic_directory
from moekit.model import Transformer, load_model, save_model
from moekit.model.io import load_weights


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_exact(tmp_path, tie):
    model = Transformer(replace(preset("tiny"), tie_embeddings=tie)).eval()
    with torch.no_grad():  # buffers (adaptive coefficient) must travel too
        model.layers[0].ffn.aux_coefficient.value.fill_(0.123)
    save_model(model, tmp_path / "ck", extra={"note": "kept"})
    loaded = load_model(tmp_path / "ck")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = torch.randint(0, 2048, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert (loaded.lm_head is None) == tie


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config.json: no such file"):
        load_model(tmp_path / "empty")
    save_model(Transformer(preset("tiny")), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="embed_tokens.weight has shape"):
        load_weights(Transformer(replace(preset("tiny"), vocab_size=100)), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="22 tensors missing"):
        load_weights(Transformer(replace(preset("tiny"), num_layers=6)), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(tmp_path / "ck")


def test_failed_write_leaves_the_old_folder(tmp_path):
    save_model(Transformer(preset("tiny")), tmp_path / "ck", extra={"version": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "ck") as staging:
            (staging / "config.json").write_text("half")
            raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


def test_newer_format_is_refused(tmp_path):
    import json
    save_model(Transformer(preset("tiny")), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["format"] == "moekit" and config["format_version"] == 2
    config["format_version"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 3 was written by a newer moekit"):
        load_model(tmp_path / "ck")
