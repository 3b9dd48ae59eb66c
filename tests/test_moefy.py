"""moefy on tiny Hugging Face models built from configs, on moekit's dense Transformer and on a
model of the user's own: logits unchanged at initialisation (the original model is the
reference), the converted model trains, and generation still works."""
import pytest
import torch
import torch.nn as nn

from moekit.config import ModelConfig
from moekit.convert import FFNAdapter, MoEFeedForward, moe_stats, moefy, router_loss
from moekit.model import Transformer, generate
from moekit.moe import GroupedExperts, MoELayer, ModuleExperts

transformers = pytest.importorskip("transformers")

VOCAB = 53


def _hf_model(kind):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64)
        return transformers.GPT2LMHeadModel(config).eval()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    return model_class(config_class(intermediate_size=48, num_key_value_heads=2,
                                    max_position_embeddings=64, **common)).eval()


@pytest.mark.parametrize("kind, experts_type", [("llama", GroupedExperts),
                                                ("mistral", GroupedExperts),
                                                ("qwen2", GroupedExperts),
                                                ("gpt2", ModuleExperts)])
def test_hugging_face_model_keeps_its_logits_and_generation_then_trains(kind, experts_type):
    original = _hf_model(kind)
    model = moefy(original, num_experts=4, top_k=2, inplace=False)
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == 2 and all(isinstance(m.moe.experts, experts_type) for m in layers)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits,
                                   rtol=1e-4, atol=1e-5)
    expected = original.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=6, do_sample=False), expected)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss + router_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    stats = moe_stats(model)
    assert len(stats) == 2 and all(s.num_tokens == ids.numel() for s in stats)
    assert all(m.moe.router.weight.grad is not None for m in layers)


def test_moekit_dense_transformer_becomes_an_moe_transformer_in_place():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                         ffn_size=48, max_seq_len=64)
    model = Transformer(config).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    prompt = [[1, 2, 3]]
    expected_tokens = generate(model, prompt, max_new_tokens=5)
    same = moefy(model, num_experts=4, top_k=1)
    assert same is model and model.config.moe.num_experts == 4
    assert all(isinstance(block.ffn, MoELayer) for block in model.layers)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    assert len(out.moe_stats) == 2
    assert generate(model, prompt, max_new_tokens=5) == expected_tokens


class Feed(nn.Module):
    """A block moefy does not know: biased Linear layers and a tanh."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(),
                                   nn.Linear(2 * width, width))

    def forward(self, x):
        return self.inner(x)


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.blocks = nn.ModuleList(Feed(width) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("ffn", [Feed, r"blocks\.[02]"], ids=["type", "pattern"])
def test_user_blocks_by_type_or_name_pattern(ffn):
    net = Net().eval()
    x = torch.randn(5, 7, 16)
    expected = net(x)
    adapter = FFNAdapter(hidden_size=lambda block: block.inner[0].in_features)
    moefy(net, num_experts=3, top_k=2, ffn=ffn, adapter=adapter)
    converted = [i for i, block in enumerate(net.blocks) if isinstance(block, MoEFeedForward)]
    assert converted == ([0, 1, 2] if ffn is Feed else [0, 2])
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)


def test_fresh_experts_differ_from_the_block_and_from_each_other():
    net = Net().eval()
    x = torch.randn(4, 16)
    block = net.blocks[1]
    expected = block(x)
    moefy(net, num_experts=2, top_k=1, ffn=Feed, init="fresh", seed=1)
    experts = net.blocks[1].moe.experts.experts
    outputs = [expert(x) for expert in experts]
    assert not torch.allclose(outputs[0], expected) and not torch.allclose(outputs[0], outputs[1])
    # Re-drawn at the block's scale.
    weight = block.inner[0].weight
    assert experts[0].inner[0].weight.std().item() == pytest.approx(weight.std().item(), rel=0.2)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="found no feed-forward block in Net"):
        moefy(Net(), num_experts=2, ffn=r"nothing\.here")
    with pytest.raises(ValueError, match="init='warm' is not allowed"):
        moefy(Net(), num_experts=2, ffn=Feed, init="warm")
    with pytest.raises(ValueError, match="ffn=3 is not allowed"):
        moefy(Net(), num_experts=2, ffn=3)
    with pytest.raises(ValueError, match="cannot be split"):
        moefy(Net(), num_experts=2, ffn=Feed, granularity=2)


def test_hugging_face_padding_is_not_routed_or_counted():
    model = moefy(_hf_model("llama"), num_experts=4, top_k=2)
    block = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    long_ids, short_ids = torch.randint(1, VOCAB, (1, 12)), torch.randint(1, VOCAB, (1, 7))
    ids = torch.cat([long_ids, torch.nn.functional.pad(short_ids, (0, 5))])
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: the real tokens never attend to it
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        padded_stats = block.last_stats
        alone, alone_counts = [], []
        for sequence in (long_ids, short_ids):  # the reference: each sequence without padding
            alone.append(model(sequence).logits[0])
            alone_counts.append(block.last_stats.tokens_per_expert_E)
    assert padded_stats.num_tokens == 19
    assert torch.equal(padded_stats.tokens_per_expert_E, sum(alone_counts))
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, :7], alone[1], rtol=1e-4, atol=1e-5)

    # Generation with left padding and a KV cache: each step's block sees the mask's last columns.
    routed = []
    block.register_forward_hook(lambda module, args, output: routed.append(
        module.last_stats.num_tokens))
    prompts = torch.randint(1, VOCAB, (2, 6))
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[0, :2] = 0
    model.generate(prompts, attention_mask=prompt_mask, max_new_tokens=3, do_sample=False)
    assert routed == [10, 2, 2]
