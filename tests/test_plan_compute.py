"""FLOPs per token, MFU, the Hunyuan scaling law: against counted FLOPs and hand computations."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.config import ModelConfig, MoEConfig, preset
from moekit.model import Transformer
from moekit.plan import (active_params_for_budget, budget_plan, count_parameters, device,
                         hunyuan_compute, tokens_for_budget, training_flops_per_token,
                         utilisation)


def counted_training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them, per token.

    float64 sends the experts down the block-by-block matmul path and the math backend spells
    attention out as matmuls, so that the counter sees every multiplication."""
    model = Transformer(config).double()
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids).logits.sum().backward()
    return counter.get_total_flops() / ids.numel()


@pytest.mark.parametrize("config", [
    ModelConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_size=96, qk_norm=True),
    ModelConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, ffn_size=96,
                tie_embeddings=True),
    ModelConfig(vocab_size=50, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                ffn_size=96, cla_share=2, moe_every=2,
                moe=MoEConfig(hidden_size=64, ffn_size=32, num_experts=4, top_k=2,
                              num_shared_experts=1)),
], ids=["gqa-qknorm", "tied", "moe-cla-shared"])
def test_model_flops_equal_counted_flops(config):
    seq_len = 16
    flops = training_flops_per_token(config, seq_len)
    counts = count_parameters(config)
    # The counter sees no FLOPs in the norms' weights, nor in the combine of each token's K
    # expert outputs (an embedding_bag forward, a gather and per-row dot products back): both
    # are elementwise work to it, and to the model-FLOPs convention.
    norms = 6 * counts.component("norms").total
    assert counted_training_flops_per_token(config, seq_len) == flops.model_flops - norms


def test_six_n_and_hunyuan_fit_side_by_side():
    config = preset("mixtral-8x7b")
    flops = training_flops_per_token(config, 4096)
    n = count_parameters(config).active_without_embeddings
    assert flops.active_params == n
    assert flops.six_n == 6 * n
    assert flops.hunyuan_fit == pytest.approx(9.59 * n + 2.3e8)


def test_skywork_mfu_from_its_published_throughput():
    # Skywork-MoE report (arXiv 2406.06563): 690 tokens per GPU per second on A800 (312 TFLOPS
    # BF16 dense), sequence 8,192, published MFU 38%. By hand, PaLM's formula: 6 (N + V D)
    # + 12 L H Dh S with N = 22,087,328,256 (tested in test_plan_params.py).
    per_token = 6 * (22_087_328_256 + 65_536 * 4_608) + 12 * 52 * 36 * 128 * 8_192
    flops = training_flops_per_token(preset("skywork-moe-146b"), 8192)
    mfu = utilisation(flops, 690, device("A800").peak_tflops * 1e12)
    assert mfu.mfu == pytest.approx(per_token * 690 / 312e12)
    # The formula gives ~35%, not the published 38% (docs/plan.md explains the gap) and the
    # Hunyuan fit's FLOPs give ~47%: the published figure lies between the two.
    assert mfu.mfu < 0.38 < mfu.hunyuan_fit_mfu


def test_hunyuan_scaling_law_by_hand():
    # Hunyuan-Large report (arXiv 2411.02265): C = 9.59 N D + 2.3e8 D.
    # N = 1e9, D = 1e12: 9.59e21 + 2.3e20 = 9.82e21.
    assert hunyuan_compute(1e9, 1e12) == pytest.approx(9.82e21)
    assert tokens_for_budget(9.82e21, 1e9) == pytest.approx(1e12)
    assert active_params_for_budget(9.82e21, 1e12) == pytest.approx(1e9)
    plan = budget_plan(1e24, 52e9)
    assert plan.published_optimal_active_params == 58.1e9  # quoted as published, not derived
    assert plan.tokens == pytest.approx(1e24 / (9.59 * 52e9 + 2.3e8))


def test_device_table():
    assert device("RTX 4090") == device("rtx-4090") == device("rtx4090")
    assert device("H100").peak_tflops == 989.0  # NVIDIA H100 SXM datasheet, BF16 dense


@pytest.mark.parametrize("call, words", [
    (lambda: device("tpu-v9"), ["unknown device 'tpu-v9'", "a100", "--peak-tflops"]),
    (lambda: tokens_for_budget(-1.0, 1e9), ["budget_flops=-1.0", "> 0"]),
    (lambda: active_params_for_budget(1e20, 1e12), ["budget_flops=1e+20", "must exceed"]),
    (lambda: hunyuan_compute(1e9, float("nan")), ["tokens=nan"]),
    (lambda: training_flops_per_token(preset("tiny"), 0), ["seq_len=0", "positive integer"]),
    (lambda: utilisation(training_flops_per_token(preset("tiny"), 8), -5, 1e12),
     ["tokens_per_second=-5"]),
])
def test_bad_input_names_the_value(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value)
