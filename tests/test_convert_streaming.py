"""`moekit import` and `export` stream: the folders they write are byte for byte what building
the model in memory writes, their memory stays under one shard and one stacked expert tensor
(measured in a subprocess), FP8 checkpoints are dequantized, and every bad input is one line
naming the file, tensor or config key, with nothing written."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_hf_export import VOCAB, _saved_hf_model  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.convert.hf import (export_weights, import_weights, load_converted_state,  # noqa: E402
                               model_config_from_hf)
from moekit.convert.hf_folder import shard_names  # noqa: E402
from moekit.files import read_safetensors  # noqa: E402
from moekit.model import Transformer, load_model, save_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _import_in_memory(source: Path, destination: Path, dtype=None) -> None:
    """Import as moekit did before it streamed: every tensor read, the model built whole."""
    values = json.loads((source / "config.json").read_text())
    tensors = {}
    for path in source.glob("*.safetensors"):
        tensors.update(load_file(path))
    model = Transformer(model_config_from_hf(values))
    model.to(dtype or tensors["model.embed_tokens.weight"].dtype)
    load_converted_state(model, import_weights(tensors, values["model_type"]))
    save_model(model, destination, extra={"imported_from": str(source)}, tokenizer_from=source)


@pytest.mark.parametrize("layout, dtype, save_options, flags", [
    ("mixtral", torch.bfloat16, dict(max_shard_size="20KB"), []),  # bf16 kept, sharded
    ("qwen2_moe", torch.float32, {}, ["--dtype", "bf16"]),  # cast, shared expert, QKV bias
    ("qwen3_moe", torch.float32, {}, []),  # tied embeddings, QK-norm
])
def test_streamed_import_writes_the_in_memory_bytes(tmp_path, layout, dtype, save_options,
                                                    flags):
    _saved_hf_model(tmp_path / "hf", layout, **save_options).to(dtype).save_pretrained(
        tmp_path / "hf", **save_options)
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "streamed"),
                 *flags]) == 0
    _import_in_memory(tmp_path / "hf", tmp_path / "built", torch.bfloat16 if flags else None)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "built")


def test_streamed_export_writes_the_in_memory_bytes(tmp_path):
    _saved_hf_model(tmp_path / "hf", "mixtral")
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    assert main(["export", "--from", str(tmp_path / "m"), "--layout", "mixtral",
                 "--max-shard-size", "30KB", "--out", str(tmp_path / "streamed")]) == 0
    # In memory, as export did before: the model loaded, every file tensor copied, and
    # safetensors' own writer.
    model = load_model(tmp_path / "m")
    tensors = {name: t.clone() for name, t in export_weights(model.state_dict(),
                                                            "mixtral").items()}
    files = shard_names({name: t.nbytes for name, t in tensors.items()}, 30_000)
    assert len(set(files.values())) > 1
    for file in set(files.values()):
        expected = {name: t for name, t in tensors.items() if files[name] == file}
        save_file(expected, str(tmp_path / "expected"), metadata={"format": "pt"})
        assert (tmp_path / "streamed" / file).read_bytes() == (tmp_path / "expected").read_bytes()
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == files


def test_memory_stays_under_a_shard_and_a_stacked_expert_tensor(tmp_path):
    """A 170 MB folder (2 layers of 4 experts, 1024 x 3072, bf16) in 50 MB shards; the growth
    of RssAnon during `moekit import` and `moekit export`, each in a fresh process. Building
    the model whole, as import did before, grows by the checkpoint and its stacked copies."""
    layers, experts, hidden, ffn, shard = 2, 4, 1024, 3072, 50_000_000
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "convert_memory.py"), "--json", "--dir",
         str(tmp_path), "--geometry", *map(str, (layers, experts, hidden, ffn)),
         "--shard-bytes", str(shard)], check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    checkpoint = 2 * (layers * (experts * 3 * hidden * ffn + 4 * hidden**2 + 2 * hidden)
                      + 2 * 1024 * hidden + experts * hidden * layers + hidden)
    assert report["sizes"]["total"] == checkpoint > 160e6
    stacked = 2 * experts * 2 * ffn * hidden  # one layer's gate_up_proj, bf16
    margin = 64 * 2**20  # the process's fixed costs: torch's meta kernels loaded on first use
    for step in ("import", "export"):
        assert report[step]["code"] == 0
        assert report[step]["peak_growth"] < shard + stacked + margin, (step, report)


def _fp8_blocks(weight: torch.Tensor, block: tuple[int, int]):
    """weight -> (float8 values, scale_inv per block) as DeepSeek-V3 stores them: each block
    scaled so that its largest magnitude is float8's largest."""
    rows, columns = weight.shape
    scales = torch.empty(math.ceil(rows / block[0]), math.ceil(columns / block[1]))
    quantized = torch.empty(rows, columns, dtype=torch.float8_e4m3fn)
    top = torch.finfo(torch.float8_e4m3fn).max
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            scales[i, j] = part.abs().max() / top
            quantized[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = \
                (part / scales[i, j]).to(torch.float8_e4m3fn)
    return quantized, scales


def test_block_fp8_weights_are_dequantized_on_import(tmp_path):
    _saved_hf_model(tmp_path / "hf", "mixtral")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    block = (16, 24)  # expert matrices [40, 32] and [32, 40]: whole and partial blocks
    expected = {}
    for name in [name for name in tensors if ".experts." in name]:
        quantized, scales = _fp8_blocks(tensors[name], block)
        tensors[name], tensors[name + "_scale_inv"] = quantized, scales
        dequantized = torch.empty(quantized.shape)  # by hand: each number times its block's
        for i in range(quantized.shape[0]):
            for j in range(quantized.shape[1]):
                dequantized[i, j] = quantized[i, j].float() * scales[i // block[0], j // block[1]]
        expected[name] = dequantized
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}}))
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    imported = read_safetensors(tmp_path / "m" / "model.safetensors")
    gate_up = imported["layers.1.ffn.experts.gate_up_proj"]
    assert gate_up.dtype == torch.float32 and gate_up.shape == (4, 80, 32)
    for expert in range(4):
        prefix = f"model.layers.1.block_sparse_moe.experts.{expert}"
        assert torch.equal(gate_up[expert], torch.cat([expected[f"{prefix}.w1.weight"],
                                                       expected[f"{prefix}.w3.weight"]]))
        assert torch.equal(imported["layers.1.ffn.experts.down_proj"][expert],
                           expected[f"{prefix}.w2.weight"])


def _fails(capsys, folder: Path, message: str) -> None:
    out = folder.parent / "out"
    assert main(["import", "--from", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists() and not [path for path in folder.parent.iterdir()
                                     if path.name.startswith(".out")]


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_checkpoints_are_one_line_naming_the_file_and_tensor(tmp_path, capsys):
    folder = tmp_path / "hf"
    _saved_hf_model(folder, "mixtral", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    capsys.readouterr()
    data = (folder / last).read_bytes()
    (folder / last).write_bytes(data[:len(data) - 100])  # truncated
    _fails(capsys, folder, f"{folder / last}: not a readable safetensors file")
    (folder / last).unlink()
    listed = next(name for name, file in index["weight_map"].items() if file == last)
    _fails(capsys, folder, f"{folder / last}: no such file (model.safetensors.index.json lists "
                           f"{listed} in it)")
    (folder / last).write_bytes(data)

    name = "model.layers.1.block_sparse_moe.experts.1.w1.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:-1]  # one expert's matrix a row short
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _fails(capsys, folder, f"{shard}: {name} has shape [39, 32], expert 0's "
                           f"{name.replace('.1.w1', '.0.w1')} [40, 32]")


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "config.json: model_type='gpt2' is not supported: expected one "
                              "of mixtral, "),
    (dict(mlp_bias=True), "config.json: mlp_bias=True is not supported: moekit's FFNs have no "
                          "bias"),
    (dict(hidden_act="gelu"), "config.json: hidden_act='gelu' is not supported: expected 'silu'"),
    (dict(model_type="deepseek_vl", auto_map={"AutoModelForCausalLM": "modeling.Model"}),
     "config.json: auto_map={'AutoModelForCausalLM': 'modeling.Model'} is not supported: the "
     "model needs its own code (trust_remote_code) and its model_type='deepseek_vl' is none "
     "of mixtral, "),
    (dict(quantization_config={"quant_method": "mxfp4"}),
     "config.json: quantization_config.quant_method='mxfp4' (weight_block_size=None) is not "
     "supported: moekit dequantizes block-wise 'fp8'"),
    (dict(intermediate_size=24), "model.safetensors: weights do not fit the model of the "
                                 "config: layers.0.ffn.experts.gate_up_proj has shape "
                                 "[4, 80, 32], the model needs [4, 48, 32]"),
])
def test_unsupported_configs_are_one_line_naming_the_key(tmp_path, capsys, changes, message):
    _saved_hf_model(tmp_path / "hf", "mixtral")
    capsys.readouterr()
    _edit_config(tmp_path / "hf", **changes)
    _fails(capsys, tmp_path / "hf", message)


def test_remote_code_of_a_supported_family_imports(tmp_path):
    """auto_map beside a model_type moekit maps: the family's own code is not needed."""
    _saved_hf_model(tmp_path / "hf", "mixtral")
    _edit_config(tmp_path / "hf", auto_map={"AutoModelForCausalLM": "modeling_mixtral.Model"})
    assert main(["import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
