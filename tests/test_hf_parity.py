"""The MoE layer against Hugging Face transformers' own sparse MoE blocks, same weights:
forward outputs and the gradients of the input and of every weight."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, Qwen2MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

from hf_checks import assert_left_padded_logits_equal  # noqa: E402
from moekit.convert.hf import moe_layer_from_hf_block  # noqa: E402


def _mixtral():
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                           num_experts_per_tok=2)
    return config, MixtralSparseMoeBlock(config)


def _qwen2_moe():
    config = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, num_experts=8,
                            num_experts_per_tok=3, norm_topk_prob=False)
    return config, Qwen2MoeSparseMoeBlock(config)


def _hf_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("make", [_mixtral, _qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_forward_and_gradients_equal_hugging_face(make):
    config, block = make()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    layer = moe_layer_from_hf_block(block, config)
    # fp32 and sizes aligned for torch's grouped_mm: the layer's fast path.
    x_hf = torch.randn(3, 11, 32, requires_grad=True)
    x_ours = x_hf.detach().clone().requires_grad_()
    expected = _hf_output(block, x_hf)
    got, stats = layer(x_ours)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad,
                               block.experts.gate_up_proj.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.down_proj.grad,
                               block.experts.down_proj.grad,
                               rtol=1e-4, atol=1e-5)
    if layer.shared_experts is not None:
        for name, p in layer.shared_experts.named_parameters():
            torch.testing.assert_close(p.grad, block.shared_expert.get_parameter(name).grad,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.shared_gate.weight.grad,
                                   block.shared_expert_gate.weight.grad, rtol=1e-4, atol=1e-5)
    assert stats.tokens_per_expert_E.sum() == 33 * config.num_experts_per_tok


def test_switch_balance_loss_is_hugging_face_loss_over_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    config, block = _mixtral()
    with torch.no_grad():
        for p in block.parameters():  # HF leaves expert weights uninitialised (torch.empty)
            p.normal_(0, 0.2)
    layer = moe_layer_from_hf_block(block, config)
    x = torch.randn(40, 32)
    _, stats = layer(x)
    logits = torch.nn.functional.linear(x, block.gate.weight)
    expected = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(stats.aux_loss, expected / 2, rtol=1e-5, atol=1e-6)


def _tiny_hf_models():
    from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
    from transformers import Qwen3MoeConfig
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    yield MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4,
                                           rope_theta=5e5, **common))
    yield Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24, num_experts=4,
                                             num_experts_per_tok=2, decoder_sparse_step=2,
                                             **common))
    yield Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=16,
                                             num_experts=4, num_experts_per_tok=2, head_dim=16,
                                             norm_topk_prob=True, tie_word_embeddings=True,
                                             **common))


@pytest.mark.parametrize("index", range(3), ids=["mixtral", "qwen2_moe", "qwen3_moe"])
def test_whole_model_logits_equal_hugging_face(index):
    from moekit.convert.hf import transformer_from_hf
    hf_model = list(_tiny_hf_models())[index].eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model = transformer_from_hf(hf_model).eval()
    ids = torch.randint(0, 61, (2, 13))
    expected = hf_model(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert_left_padded_logits_equal(model, hf_model, ids)
