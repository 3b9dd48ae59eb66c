"""Weight-only quantization: scales against hand computations, error bounds of e4m3 and int8
rounding, the quantized model against one built from dequantized weights, exact save/load, CLI."""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moekit.config import preset
from moekit.files import CheckpointError
from moekit.model import Transformer, load_model, save_model
from moekit.quant import (QuantGroupedExperts, folder_bytes, load_for_inference, quantize_model,
                          quantize_weight, save_quantized)
from moekit.quant.weights import dequantize


def test_int8_scale_and_values_by_hand():
    weight = torch.tensor([[1.0, -0.6, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_weight(weight, "int8", input_dim=1)
    assert q.dtype == torch.int8 and scale.shape == (2, 1)
    assert scale[0, 0].item() == pytest.approx(1.0 / 127)  # max |w| of the row / 127
    assert q[0].tolist() == [127, -76, 32, 0]  # round(w * 127): 127, -76.2, 31.75, 0
    assert q[1].tolist() == [0, 0, 0, 0]  # an all-zero row stays zero (no division by zero)


def test_fp8_scale_and_values_by_hand():
    weight = torch.tensor([[2.0, -1.0, 0.5, 0.3]])
    q, scale = quantize_weight(weight, "fp8", input_dim=1)
    assert q.dtype == torch.float8_e4m3fn
    assert scale.item() == pytest.approx(2.0 / 448)  # e4m3's largest finite value is 448
    # w / scale = 448, -224, 112, 67.2; e4m3 numbers between 64 and 128 are 8 apart: 67.2 -> 64.
    assert q.float().tolist() == [[448.0, -224.0, 112.0, 64.0]]


def test_expert_scales_are_per_expert_and_output_column():
    weight_EIO = torch.randn(3, 5, 4)
    _, scale_E1O = quantize_weight(weight_EIO, "int8", input_dim=1)
    assert scale_E1O.shape == (3, 1, 4)
    for expert in range(3):
        for column in range(4):
            largest = max(abs(float(weight_EIO[expert, row, column])) for row in range(5))
            assert scale_E1O[expert, 0, column].item() == pytest.approx(largest / 127)


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_rounding_error_bounds(dtype):
    weight = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    q, scale = quantize_weight(weight, dtype, input_dim=1)
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    if dtype == "int8":  # round to nearest integer step: half a step at most
        bound = (scale / 2).expand_as(weight)
    else:  # e4m3: 3 mantissa bits (relative 2^-4); subnormals are 2^-9 * scale apart
        bound = torch.maximum(weight.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert (error <= bound * (1 + 1e-6)).all()
    x = torch.randn(5, 96)  # a linear output errs by at most sum_i |x_i| * bound_i
    output_error = (F.linear(x, dequantize(q, scale, torch.float32)) - F.linear(x, weight)).abs()
    assert (output_error <= x.abs() @ bound.T + 1e-5).all()


def _dequantized_copy(model, parts):
    """The reference: a full-precision model whose weights are replaced by their dequantized
    values, computed by the ordinary modules."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            part = ("embeddings" if name.startswith(("embed_tokens", "lm_head")) else
                    "attention" if ".attn." in name and "norm" not in name else
                    "experts" if ".ffn." in name and "router" not in name else None)
            if parts.get(part) and tensor.dim() >= 2:
                tensor.copy_(dequantize(*quantize_weight(tensor, parts[part], input_dim=-1),
                                        torch.float32))
    return reference


@pytest.mark.parametrize("parts", [dict(experts="fp8", attention=None, embeddings=None),
                                   dict(experts="int8", attention="fp8", embeddings="int8"),
                                   dict(experts=None, attention="int8", embeddings="fp8")])
@pytest.mark.parametrize("tie", [False, True])
def test_quantized_model_equals_dequantized_weights(parts, tie):
    config = replace(preset("tiny"), tie_embeddings=tie, num_layers=2, moe_every=2)
    model = Transformer(replace(config, moe=replace(config.moe, num_shared_experts=1))).eval()
    reference = _dequantized_copy(model, parts)
    quantize_model(model, **parts)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    cache = model.new_cache(2, 12)  # decoding: only the chosen experts are dequantized
    model(ids, cache=cache)
    step = torch.randint(0, config.vocab_size, (2, 1))
    full = reference(torch.cat([ids, step], 1)).logits[:, -1]
    torch.testing.assert_close(model(step, cache=cache).logits[:, -1], full)


def test_quantization_shrinks_the_weights():
    model = quantize_model(Transformer(preset("tiny")), experts="fp8", attention="int8")
    experts = model.layers[0].ffn.experts
    assert isinstance(experts, QuantGroupedExperts)
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert model.layers[0].attn.q_proj.weight.dtype == torch.int8
    assert model.embed_tokens.weight.dtype == torch.float32  # embeddings=None: untouched


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = quantize_model(Transformer(preset("tiny")).eval(), experts="fp8", attention="int8",
                           embeddings="fp8")
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "tokenizer.json").write_text("{}")
    save_quantized(model, tmp_path / "q", tokenizer_from=tmp_path / "source")
    loaded = load_for_inference(tmp_path / "q")
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    ids = torch.randint(0, 2048, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"experts": "fp8", "attention": "int8",
                                      "embeddings": "fp8", "dtype": "float32"}
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    with pytest.raises(CheckpointError, match="quantized model; load it with"):
        load_model(tmp_path / "q")


def test_bf16_model_stays_bf16(tmp_path):
    model = quantize_model(Transformer(preset("tiny")).to(torch.bfloat16).eval(),
                           embeddings="int8")
    save_quantized(model, tmp_path / "q")
    loaded = load_for_inference(tmp_path / "q")
    ids = torch.randint(0, 2048, (1, 5))
    assert loaded(ids).logits.dtype == torch.bfloat16
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_names():
    with pytest.raises(ValueError, match=r"experts='fp4' is not allowed: expected one of fp8, "
                                         r"int8, or None"):
        quantize_model(Transformer(preset("tiny")), experts="fp4")
    model = quantize_model(Transformer(preset("tiny")))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(Transformer(preset("tiny")), "unused")


def test_cli_reports_sizes_and_perplexity(tmp_path, capsys):
    from moekit.cli import main
    from moekit.train.tokenizer import train_tokenizer
    model = Transformer(replace(preset("tiny"), vocab_size=300)).eval()
    save_model(model, tmp_path / "ck")
    train_tokenizer(["a small text to learn a few merges from"] * 4, 300).save(tmp_path / "ck")
    (tmp_path / "valid.txt").write_text("some validation text, twice. " * 20)
    assert main(["quantize", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "q"),
                 "--dtype", "int8", "--embeddings", "fp8", "--text",
                 str(tmp_path / "valid.txt"), "--window", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    disk = lines[2].split()
    assert int(disk[3].replace(",", "")) == folder_bytes(tmp_path / "ck")
    assert int(disk[4].replace(",", "")) == sum(
        p.stat().st_size for p in (tmp_path / "q").iterdir())
    before, after = map(float, lines[4].split()[1:3])
    assert math.isfinite(before) and abs(after / before - 1) < 0.05
    assert load_for_inference(tmp_path / "q").quantization["experts"] == "int8"
    assert main(["quantize", "--checkpoint", str(tmp_path / "q"), "--out",
                 str(tmp_path / "q2"), "--dtype", "fp8"]) == 2
    assert "holds a quantized model" in capsys.readouterr().err


def test_fp8_scaled_matmul_is_within_the_activation_rounding_bound():
    # The FP8 tensor-core path (used on CUDA GPUs of capability >= 8.9) also runs on this CPU
    # build; it quantizes the activations too, so each product term may err by the e4m3
    # rounding of x (relative 2^-4) on top of the weight's.
    from moekit.quant.modules import fp8_scaled_linear, native_fp8
    weight = torch.randn(48, 64)
    q, scale = quantize_weight(weight, "fp8", input_dim=1)
    dequantized = dequantize(q, scale, torch.float32)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    got = fp8_scaled_linear(x, q, scale).float()
    expected = F.linear(x.float(), dequantized)
    bound = (x.float().abs() @ dequantized.abs().T) * 2.0 ** -4 + 2.0 ** -7 * expected.abs()
    assert got.shape == (2, 5, 48) and ((got - expected).abs() <= bound + 1e-3).all()
    assert not native_fp8(x, q)  # on a CPU the dequantizing path runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_table_conversion_equals_torch_for_every_e4m3_value(dtype):
    from moekit.quant.weights import convert
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(convert(every, dtype).isnan(), every.to(dtype).isnan())
    finite = ~every.to(dtype).isnan()
    assert torch.equal(convert(every, dtype)[finite], every.to(dtype)[finite])


def _int8_kernel_calls(run) -> int:
    """How many times ``run()`` calls torch's CPU int8 kernel (the fast path)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return sum(event.count for event in profile.key_averages()
               if event.key == "aten::_weight_int8pack_mm")


def _assert_close_in(dtype, got, expected):
    # bf16: the output's rounding (2^-8 relative), twice on the fallback (product, then scale).
    tolerance = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)


def _fallback(monkeypatch, run):
    """``run()`` with the int8 kernel ruled out: the dequantizing path (GPUs, fp8)."""
    with monkeypatch.context() as patched:
        patched.setattr("moekit.quant.modules.int8_kernel_fits", lambda x, weight: False)
        return run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_kernel_equals_fallback_and_dequantized_weights(dtype, monkeypatch):
    from moekit.quant import QuantLinear
    linear = torch.nn.Linear(64, 48).to(dtype)
    quantized = QuantLinear(linear, "int8")
    x = torch.randn(2, 3, 64, dtype=dtype)  # decoding: few rows (prefill converts the weight)
    expected = F.linear(x.float(), dequantize(quantized.weight, quantized.weight_scale,
                                              torch.float32), linear.bias.float())
    with torch.no_grad():
        assert _int8_kernel_calls(lambda: quantized(x)) == 1
        got = quantized(x)
        assert got.dtype == dtype and got.shape == (2, 3, 48)
        _assert_close_in(dtype, got, expected)
        _assert_close_in(dtype, got, _fallback(monkeypatch, lambda: quantized(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_int8_expert_kernel_equals_fallback_and_dequantized_weights(dtype, activation,
                                                                   monkeypatch):
    from moekit.moe import GroupedExperts
    experts = GroupedExperts(4, 32, 48, activation).to(dtype)
    quantized = QuantGroupedExperts(experts, "int8")
    with torch.no_grad():
        for name in (quantized.in_name, "down_proj"):
            getattr(experts, name).copy_(dequantize(getattr(quantized, name),
                                                    getattr(quantized, f"{name}_scale"), dtype))
        experts.float()
        tokens_per_expert = torch.tensor([3, 0, 2, 1])
        x = torch.randn(6, 32, dtype=dtype)
        # Two products for each of the three experts that got tokens.
        assert _int8_kernel_calls(lambda: quantized(x, tokens_per_expert)) == 6
        got = quantized(x, tokens_per_expert)
        _assert_close_in(dtype, got, experts(x.float(), tokens_per_expert))
        _assert_close_in(dtype, got, _fallback(monkeypatch,
                                               lambda: quantized(x, tokens_per_expert)))
        assert quantized(x[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 32)


def test_int8_kernel_is_skipped_where_it_does_not_fit():
    # bf16 activations with an input width not a multiple of 16: torch's kernel errs there.
    from moekit.quant import QuantLinear
    quantized = QuantLinear(torch.nn.Linear(40, 8, bias=False).to(torch.bfloat16), "int8")
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    expected = F.linear(x.float(), dequantize(quantized.weight, quantized.weight_scale,
                                              torch.float32))
    with torch.no_grad():
        assert _int8_kernel_calls(lambda: quantized(x)) == 0
        _assert_close_in(torch.bfloat16, quantized(x), expected)


def test_int8_experts_keep_the_kernel_layout_through_save_and_load(tmp_path):
    model = quantize_model(Transformer(preset("tiny")).eval(), experts="int8", attention=None)
    save_quantized(model, tmp_path / "q")
    loaded = load_for_inference(tmp_path / "q")
    experts = next(m for m in loaded.modules() if isinstance(m, QuantGroupedExperts))
    assert experts.down_proj.is_contiguous()  # each expert [out, in]
    ids = torch.randint(0, 2048, (2, 7))
    with torch.no_grad():
        assert _int8_kernel_calls(lambda: loaded(ids)) > 0
        assert torch.equal(model(ids).logits, loaded(ids).logits)
