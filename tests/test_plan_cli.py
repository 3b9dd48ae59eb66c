"""`moekit plan`: the same numbers as rich tables and as JSON; inputs from presets, files,
checkpoint folders and flags; bad input is one line and exit code 2."""
import json
from dataclasses import replace

import pytest
import torch

from moekit.cli import main
from moekit.config import ModelConfig, preset
from moekit.model import Transformer, save_model


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def built_total(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())


def test_skywork_on_eight_rtx_4090_in_fp8(capsys):
    # mission.md: Skywork-MoE in FP8 on 8 RTX 4090 (24 GB each), weights about 146 GB.
    plan = plan_json(capsys, "--preset", "skywork-moe-146b", "--device", "rtx4090",
                     "--world-size", "8", "--infer-dtype", "fp8")
    assert plan["parameters"]["total"] == built_total(preset("skywork-moe-146b"))
    fp8, = plan["inference_memory"]
    assert fp8["fits"] and fp8["device_memory_bytes"] == 24 * 2**30
    # By hand: all weights at 1 byte, the 483,840 norm weights at 2.
    assert fp8["weight_bytes"] == 146_356_167_168 + 483_840
    assert fp8["free_bytes_per_device"] == pytest.approx(24 * 2**30 - fp8["weight_bytes"] / 8)


def test_mixtral_on_one_24_gib_device_needs_offloading(capsys):
    plan = plan_json(capsys, "--preset", "mixtral-8x7b", "--device-memory-gib", "24",
                     "--infer-dtype", "bf16", "--hit-rate", "0.5")
    bf16, = plan["offload"]
    # By hand: one expert is 3 matrices of 4096 x 14336 in bf16; 8 experts x 32 layers; each
    # token takes 2 routes in each of 32 layers, half of them missing the cache.
    expert = 3 * 4096 * 14336 * 2
    assert bf16["expert_bytes"] == expert and bf16["experts"] == 256
    assert bf16["resident_bytes"] == bf16["weight_bytes"] - 256 * expert
    assert not bf16["fits_resident"] and bf16["fits_offloaded"]
    assert bf16["cache_bytes"] == 24 * 2**30 - bf16["resident_bytes"]
    assert bf16["cached_experts"] == (24 * 2**30 - bf16["resident_bytes"]) // expert
    assert bf16["bytes_per_token"] == 0.5 * 2 * 32 * expert
    # Without --hit-rate: uniform routing, each route hits with cached / all experts.
    uniform, = plan_json(capsys, "--preset", "mixtral-8x7b", "--expert-memory", "16GiB",
                         "--infer-dtype", "bf16")["offload"]
    cached = 16 * 2**30 // expert
    assert uniform["cached_experts"] == cached and uniform["fits_resident"] is None
    assert uniform["bytes_per_token"] == pytest.approx((1 - cached / 256) * 64 * expert)


def test_tables_show_every_section(capsys):
    assert main(["plan", "--preset", "hunyuan-large-389b", "--seq-len", "4096",
                 "--tokens", "7e12", "--budget-flops", "1e24", "--device", "h800",
                 "--tokens-per-second", "300", "--world-size", "64", "--pipeline", "4",
                 "--expert", "16", "--zero", "1", "--recompute", "--upcycle",
                 "--dense-tokens", "1e12", "--moe-tokens", "7e12"]) == 0
    out = capsys.readouterr().out
    for words in ("Parameters", "389.527 B", "Hunyuan MoE fit", "MFU", "58.100 B", "95.0%",
                  "Training memory per device", "ZeRO-1", "with recomputation",
                  "fits in 80 GiB", "Inference on 64 x 80 GiB", "scratch"):
        assert words in out


def test_flags_override_a_preset_and_build_a_model(capsys):
    plan = plan_json(capsys, "--preset", "tiny", "--moe-num-experts", "4", "--hidden-size", "64",
                     "--tie-embeddings", "true")
    config = preset("tiny")
    expected = replace(config, hidden_size=64, tie_embeddings=True,
                       moe=replace(config.moe, num_experts=4, hidden_size=64))
    assert plan["parameters"]["total"] == built_total(expected)
    dense = plan_json(capsys, "--vocab-size", "100", "--hidden-size", "32", "--num-layers", "2",
                      "--num-heads", "4", "--ffn-size", "64")
    assert dense["model"]["moe"] is None
    assert dense["parameters"]["total"] == built_total(ModelConfig(
        vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64))


def test_config_file_and_checkpoint_folder(capsys, tmp_path):
    config = preset("tiny")
    folder = tmp_path / "model"
    save_model(Transformer(config), folder)
    from_folder = plan_json(capsys, "--config", str(folder))
    from_file = plan_json(capsys, "--config", str(folder / "config.json"))
    toml = tmp_path / "model.toml"
    toml.write_text('vocab_size = 2048\nhidden_size = 128\nnum_layers = 4\nnum_heads = 4\n'
                    'num_kv_heads = 2\nffn_size = 256\nmax_seq_len = 256\n[moe]\n'
                    'hidden_size = 128\nffn_size = 128\nnum_experts = 8\ntop_k = 2\n')
    from_toml = plan_json(capsys, "--config", str(toml))
    total = built_total(config)
    assert (from_folder["parameters"]["total"] == from_file["parameters"]["total"]
            == from_toml["parameters"]["total"] == total)


@pytest.mark.parametrize("args, words", [
    (["--preset", "gpt-9"], "unknown preset 'gpt-9'"),
    (["--preset", "tiny", "--device", "tpu"], "unknown device 'tpu'"),
    (["--preset", "tiny", "--world-size", "6", "--tensor", "4"], "world_size=6"),
    (["--preset", "mixtral-8x7b", "--world-size", "8", "--expert", "3"],
     "expert=3 does not divide num_experts=8"),
    (["--preset", "skywork-moe-146b", "--world-size", "12", "--pipeline", "12",
      "--stage-layers", "5,5"], "stage_layers=[5, 5] is not allowed"),
    (["--preset", "tiny", "--world-size", "8", "--pipeline", "8"],
     "pipeline=8 is not allowed: more stages than the model's 4 layers"),
    (["--preset", "tiny", "--hidden-size", "-8"], "hidden_size=-8"),
    (["--preset", "tiny", "--tokens=-1e12"], "tokens=-1000000000000.0"),
    (["--preset", "tiny", "--seq-len", "0"], "seq_len=0"),
    (["--preset", "tiny", "--tokens-per-second", "100"], "needs --device or --peak-tflops"),
    (["--preset", "tiny", "--upcycle"], "needs --dense-tokens and --moe-tokens"),
    (["--num-layers", "2"], "the model is incomplete"),
    (["--preset", "tiny", "--hit-rate", "1.5", "--expert-memory", "1GB"],
     "hit rate 1.5 is not allowed: expected a share from 0 to 1"),
    (["--preset", "tiny", "--hit-rate", "0.5"], "need an MoE model, and --device"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, words):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
