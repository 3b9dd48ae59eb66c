"""KV cache, activations, training and inference memory: against the model's own cache, the
bytes autograd saves, a name-by-name split of the built model, and hand computations."""
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MLAConfig, ModelConfig, MoEConfig, preset
from moekit.model import KVCache, Transformer
from moekit.plan import (GIB, Layout, Precision, inference_memory, kv_cache_bytes_per_token,
                         kv_cache_plan, training_memory)
from moekit.plan.activations import model_bytes_per_token

SMALL_MOE = MoEConfig(hidden_size=64, ffn_size=96, num_experts=4, top_k=2)
SMALL = dict(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, ffn_size=96)
CONFIGS = {
    "mha": ModelConfig(**SMALL),
    "gqa-cla": ModelConfig(**SMALL, num_kv_heads=2, cla_share=2),
    "qk-norm": ModelConfig(**SMALL, qk_norm=True),
    "moe": ModelConfig(**SMALL, moe=SMALL_MOE),
    "mla": ModelConfig(**SMALL, mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16,
                                              qk_rope_head_dim=8, v_head_dim=12)),
    "mla-query-latent": ModelConfig(**SMALL, mla=MLAConfig(
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        q_lora_rank=24)),
    "hunyuan-like": ModelConfig(**SMALL, num_kv_heads=2, cla_share=2, qk_norm=True,
                                moe=MoEConfig(hidden_size=64, ffn_size=96, num_experts=4,
                                              top_k=1, router="switch", num_shared_experts=1)),
}


@pytest.mark.parametrize("name", ["tiny", "skywork-moe-146b", "hunyuan-large-389b",
                                  "mixtral-8x7b"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kv_bytes_per_token_equal_the_models_cache(name, dtype):
    config = preset(name)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cache = KVCache(config, batch_size=1, max_len=3, device="meta", dtype=torch_dtype)
    assert kv_cache_bytes_per_token(config, dtype) * 3 == cache.nbytes


def test_hunyuan_kv_cache_saves_95_percent():
    # Hunyuan-Large report (arXiv 2411.02265), KV-cache comparison: GQA (8 KV heads for 80 query
    # heads) with CLA (one cache per 2 of its 64 layers) saves almost 95% against MHA.
    # By hand, in numbers per token: MHA 2 * 64 * 80 * 80, GQA + CLA 2 * 32 * 8 * 80.
    plan = kv_cache_plan(preset("hunyuan-large-389b"), batch=4, context=1024)
    assert plan.model_variant == "GQA + CLA"
    assert plan.variant("MHA").bytes_per_token == 2 * 64 * 80 * 80 * 2
    assert plan.variant("GQA + CLA").bytes_per_token == 2 * 32 * 8 * 80 * 2
    assert plan.variant("GQA").saving == pytest.approx(0.90)
    assert plan.variant("GQA + CLA").saving == pytest.approx(0.95)
    assert plan.variant("GQA + CLA").bytes_total == 2 * 32 * 8 * 80 * 2 * 4 * 1024


def saved_bytes_per_token(config: ModelConfig, dtype: torch.dtype, tokens: int = 64) -> float:
    """Bytes of the tensors autograd keeps for the backward of forward + loss (weights aside),
    per token: the reference the activation formulas are held to."""
    model = Transformer(config).to(dtype)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model(ids).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    return sum(kept.values()) / tokens


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_bytes_equal_what_autograd_saves(name, dtype):
    config = CONFIGS[name]
    expected = saved_bytes_per_token(config, dtype)
    assert model_bytes_per_token(config, dtype.itemsize) == pytest.approx(expected, rel=0.01)


# Which weights tensor parallelism splits, and which are experts, read from their names.
SPLIT = re.compile(r"(embed_tokens|lm_head|attn\.[qkvo]_proj|shared_experts|"
                   r"ffn\.(gate|up|down)_proj)\.")
EXPERTS = re.compile(r"\.ffn\.experts\.")


def device_parameters_by_name(config: ModelConfig, layout: Layout) -> list[int]:
    """Weights one device of each stage holds, by walking the built model's weights."""
    with torch.device("meta"):
        model = Transformer(config)
    stage_of_layer = [s for s, n in enumerate(layout.stages(config)) for _ in range(n)]
    held = [0] * layout.pipeline
    for name, weight in model.named_parameters():
        layer = re.match(r"layers\.(\d+)\.", name)
        stages = ([stage_of_layer[int(layer.group(1))]] if layer
                  else [0] if name.startswith("embed_tokens") else [layout.pipeline - 1])
        if name.startswith("embed_tokens") and config.tie_embeddings and layout.pipeline > 1:
            stages.append(layout.pipeline - 1)  # the last stage keeps its own copy
        size = weight.numel()
        size = (size // layout.expert if EXPERTS.search(name)
                else size // layout.tensor if SPLIT.search(name) else size)
        for stage in stages:
            held[stage] += size
    return held


@pytest.mark.parametrize("config, layout", [
    # four layers: a stage holds whole CLA pairs
    (replace(CONFIGS["hunyuan-like"], num_layers=4), Layout(data=2, tensor=2, pipeline=2, expert=4)),
    (ModelConfig(**{**SMALL, "num_layers": 3}, tie_embeddings=True, moe=SMALL_MOE),
     Layout(data=4, tensor=1, pipeline=2, expert=2, stage_layers=(2, 1))),
    (CONFIGS["gqa-cla"], Layout(data=1, tensor=2, pipeline=1)),
])
def test_weights_per_device_equal_a_split_of_the_built_model(config, layout):
    memory = training_memory(config, layout, seq_len=8)
    held = device_parameters_by_name(config, layout)
    assert [stage.parameters for stage in memory.stages] == held
    assert [stage.weights for stage in memory.stages] == [2 * n for n in held]


def test_states_equal_a_real_adam_step():
    # fp32 training with torch's Adam: 4-byte weights and gradients, two 4-byte moments.
    config = CONFIGS["hunyuan-like"]
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randint(0, config.vocab_size, (1, 8))).logits.sum().backward()
    optimizer.step()
    stage = training_memory(config, precision=Precision(4, 4, 8), seq_len=8).stages[0]
    assert stage.weights == sum(p.nbytes for p in model.parameters())
    assert stage.gradients == sum(p.grad.nbytes for p in model.parameters())
    assert stage.optimizer_states == sum(state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
                                         for state in optimizer.state.values())


def test_zero_shards_states_over_replicas():
    # Dense model over 4 data-parallel replicas: ZeRO-1 keeps a quarter of the optimizer
    # states, ZeRO-2 also a quarter of the gradients, ZeRO-3 also a quarter of the weights.
    config, layout = CONFIGS["mha"], Layout(data=4)
    full = training_memory(config, layout, seq_len=8).stages[0]
    for zero, quartered in ((1, {"optimizer_states"}),
                            (2, {"optimizer_states", "gradients"}),
                            (3, {"optimizer_states", "gradients", "weights"})):
        stage = training_memory(config, layout, Precision(zero_stage=zero), seq_len=8).stages[0]
        for state in ("weights", "gradients", "optimizer_states"):
            share = 4 if state in quartered else 1
            assert getattr(stage, state) == getattr(full, state) / share
    assert full.optimizer_states == 12 * full.parameters  # fp32 master + two Adam moments


def test_activations_on_one_device_and_in_a_pipeline():
    config, tokens = CONFIGS["moe"], 3 * 16  # two identical MoE layers; bf16 (b = 2)
    one = training_memory(config, micro_batch=3, seq_len=16).stages[0]
    assert one.activations == pytest.approx(tokens * model_bytes_per_token(config, 2))
    # By hand (docs/plan.md): the first stage adds RoPE's cos and sin and the token ids,
    # 2 * 2 * 16 + 8 bytes per token; the last the final norm (4D + 4 + 2 * 2 * D) and the
    # float32 log-probs (4V).
    first, last = 2 * 2 * 16 + 8, 4 * 64 + 4 + 4 * 64 + 4 * 50
    layer = (one.activations / tokens - first - last) / 2
    # Full recomputation keeps each layer's input (2 bytes x D) and rebuilds one layer.
    assert one.activations_recompute == pytest.approx(tokens * (2 * 2 * 64 + first + last
                                                                 + layer))
    # 1F1B over 2 stages of one layer each: the first holds 2 micro-batches, the last one.
    stages = training_memory(config, Layout(pipeline=2), micro_batch=3, seq_len=16).stages
    assert stages[0].activations == pytest.approx(2 * tokens * (layer + first))
    assert stages[1].activations == pytest.approx(tokens * (layer + last))


def test_skywork_on_eight_24_gib_gpus_in_fp8():
    # Skywork-MoE (mission.md): FP8 inference on one server of 8 RTX 4090 (24 GB each),
    # weights about 146 GB. By hand: 146,356,167,168 parameters at 1 byte, the 483,840 norm
    # weights (52 * 2 * 4608 + 4608) at 2 bytes.
    memory = inference_memory(preset("skywork-moe-146b"), "fp8", devices=8, device_memory_gib=24)
    weights = 146_356_167_168 + 483_840
    assert memory.weight_bytes == weights and memory.fits
    assert memory.free_bytes_per_device == pytest.approx(24 * GIB - weights / 8)
    kv_per_token = 2 * 52 * 36 * 128 * 2  # MHA, bf16
    assert memory.kv_cache_tokens == (8 * 24 * GIB - weights) // kv_per_token
    bf16 = inference_memory(preset("skywork-moe-146b"), "bf16", devices=8, device_memory_gib=24)
    assert not bf16.fits and bf16.kv_cache_tokens == 0


@pytest.mark.parametrize("call, words", [
    (lambda: Layout.for_world(10, tensor=4), ["world_size=10", "tensor x pipeline = 4 x 1"]),
    (lambda: training_memory(preset("skywork-moe-146b"), Layout(pipeline=12)),
     ["pipeline=12 does not divide num_layers=52", "stage_layers"]),
    (lambda: training_memory(preset("skywork-moe-146b"), Layout(data=2, expert=3)),
     ["expert=3 does not divide num_experts=16"]),
    (lambda: training_memory(preset("mixtral-8x7b"), Layout(data=2, expert=8)),
     ["expert=8 does not divide the 2 devices"]),
    (lambda: training_memory(preset("skywork-moe-146b"), Layout(tensor=8)),
     ["tensor=8 does not divide num_heads=36"]),
    (lambda: training_memory(preset("tiny"), Layout(pipeline=2, stage_layers=(1, 2))),
     ["stage_layers=[1, 2]", "summing to num_layers=4"]),
    (lambda: training_memory(preset("tiny").dense(), Layout(data=2, expert=2)),
     ["expert=2 is not allowed for a dense model"]),
    (lambda: Layout(data=-1), ["data=-1", "positive integer"]),
    (lambda: Precision(zero_stage=4), ["zero_stage=4"]),
    (lambda: inference_memory(preset("tiny"), "fp4", 1, 24),
     ["inference dtype 'fp4'", "bf16, fp8"]),
    (lambda: inference_memory(preset("tiny"), "fp8", 0, 24), ["devices=0"]),
    (lambda: inference_memory(preset("tiny"), "fp8", 1, -24), ["device_memory_gib=-24"]),
    (lambda: kv_cache_plan(preset("tiny"), batch=-2), ["batch=-2"]),
    (lambda: kv_cache_bytes_per_token(preset("tiny"), "fp64"), ["dtype 'fp64'"]),
])
def test_bad_input_names_the_value(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value)
