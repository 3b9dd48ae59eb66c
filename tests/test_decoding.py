"""Fast decoding: the fixed-size cache step equals recomputing the whole sequence, the
small-batch and mid-batch MoE paths equal the grouped one, and the compiled step gives the
eager tokens."""
import itertools

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.config import ModelConfig
from moekit.model import Transformer, generate
from moekit.model.decode_step import CACHE_LENGTH_STEP, DecodeStep, cache_length
from moekit.moe import layer as moe_layer
from reference import moe_forward


def _model(dtype=torch.float64, **kw):
    base = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_size=48, max_seq_len=256,
                moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, top_k=2))
    base.update(kw)
    model = Transformer(ModelConfig(**base)).to(dtype).eval()
    model.reset_parameters(std=0.3)  # sharp logits: greedy tokens vary from step to step
    return model


def _greedy_by_recomputation(model, prompt, new_tokens):
    """Each next token from a forward over the whole sequence so far, without a cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [dict(cla_share=2, qk_norm=True),
                                dict(sliding_window=5, full_attention_layers=(1,))])
def test_decoding_over_the_fixed_size_cache_equals_recomputation(kw):
    model = _model(num_layers=4, **kw)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4], [6, 6, 1]]  # left-padded together
    outputs = generate(model, prompts, 12)
    assert outputs == [_greedy_by_recomputation(model, p, 12) for p in prompts]
    assert len({token for output in outputs for token in output}) > 6  # not one token repeated


def test_cache_lengths_round_up_within_the_context():
    assert cache_length(1, 1000) == CACHE_LENGTH_STEP
    assert cache_length(CACHE_LENGTH_STEP + 1, 1000) == 2 * CACHE_LENGTH_STEP
    assert cache_length(300, 300) == 300


# (SMALL_BATCH_ROUTES, DENSE_BATCH_ROWS) that send every forward down one path.
EVERY = 2**62
PATHS = {"grouped": (0, 0), "routes": (EVERY, 0), "dense": (0, EVERY)}


def _use_path(monkeypatch, path):
    """Send every forward down ``path``, the dense one in float32 too (exact references)."""
    routes, rows = PATHS[path]
    monkeypatch.setattr(moe_layer, "SMALL_BATCH_ROUTES", routes)
    monkeypatch.setattr(moe_layer, "DENSE_BATCH_ROWS", rows)
    monkeypatch.setattr(moe_layer, "DENSE_BATCH_ROUTES_PER_EXPERT", 0)
    monkeypatch.setattr(moe_layer, "DENSE_BATCH_DTYPES", (torch.float32, torch.bfloat16))


@pytest.mark.parametrize("path,tokens", [("routes", 1), ("routes", 3), ("dense", 3),
                                         ("dense", 16)])
def test_decoding_paths_equal_the_grouped_path_and_a_loop(path, tokens, monkeypatch):
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=24, num_experts=5, top_k=2))
    x = torch.randn(tokens, 16)
    _use_path(monkeypatch, path)
    decoded, decoded_stats = layer(x)
    _use_path(monkeypatch, "grouped")
    grouped, grouped_stats = layer(x)
    torch.testing.assert_close(decoded, grouped, rtol=1e-6, atol=1e-7)  # float32 rounding
    routing = layer.router(x)
    with torch.no_grad():
        loop = moe_forward(layer.double(), x.double(), routing.expert_ids_TK,
                           routing.weights_TK.double())
    torch.testing.assert_close(decoded.double(), loop, rtol=1e-5, atol=1e-6)
    assert torch.equal(decoded_stats.tokens_per_expert_E, grouped_stats.tokens_per_expert_E)
    assert decoded_stats.dropped == grouped_stats.dropped == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_picks_the_decoding_paths_by_size_and_type(dtype):
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=24, num_experts=8, top_k=2)).to(dtype)
    chosen = []
    for name in ("forward_routes", "forward_dense", "forward"):
        method = getattr(layer.experts, name)
        setattr(layer.experts, name, lambda *a, name=name, method=method:
                chosen.append(name) or method(*a))
    sizes = (1, 2, 3, 4, 8, moe_layer.DENSE_BATCH_ROWS // 8, moe_layer.DENSE_BATCH_ROWS)
    for tokens, training in itertools.product(sizes, (False, True)):
        chosen.clear()
        with torch.set_grad_enabled(training):  # decoding runs without autograd
            layer(torch.randn(tokens, 16, dtype=dtype))
        routes, dense_rows = 2 * tokens, 8 * tokens
        expected = ("forward_routes" if routes <= moe_layer.SMALL_BATCH_ROUTES else
                    "forward_dense" if (dtype == torch.bfloat16 and routes >= 2 * 8 and not
                                        training and dense_rows <= moe_layer.DENSE_BATCH_ROWS)
                    else "forward")  # float32 or training: the grouped path (docs/inference.md)
        assert chosen == [expected], (tokens, training)


@torch.no_grad()
def test_the_dense_path_in_bfloat16_stays_within_its_rounding_of_the_grouped_one(monkeypatch):
    layer = MoELayer(MoEConfig(hidden_size=64, ffn_size=96, num_experts=8, top_k=2))
    layer.experts.reset_parameters(0.1)
    x = torch.randn(16, 64)
    _use_path(monkeypatch, "grouped")
    exact = layer.double()(x.double())[0]
    layer = layer.to(torch.bfloat16)
    grouped = layer(x.bfloat16())[0].double()
    _use_path(monkeypatch, "dense")
    dense = layer(x.bfloat16())[0].double()
    assert (dense - exact).abs().max() <= 2 * (grouped - exact).abs().max()
    torch.testing.assert_close(dense, grouped, rtol=0.05, atol=0.02 * float(exact.abs().max()))


@pytest.mark.parametrize("path", ["routes", "dense"])
def test_decoding_paths_give_the_grouped_paths_greedy_tokens(path, monkeypatch):
    model = _model(torch.float32)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1], [8]]
    prompts = prompts[:1] if path == "routes" else prompts  # one route pair, or four tokens
    _use_path(monkeypatch, path)
    decoded = generate(model, prompts, 24)
    _use_path(monkeypatch, "grouped")
    assert generate(model, prompts, 24) == decoded


def test_a_step_for_another_model_is_refused():
    with pytest.raises(ValueError, match="another model"):
        generate(_model(), [[1, 2]], 2, step=DecodeStep(_model()))


@pytest.mark.parametrize("path,batch,dtype", [
    ("routes", 1, torch.float32), ("routes", 1, torch.bfloat16),  # bf16: row products
    ("dense", 3, torch.float32), ("grouped", 3, torch.float32)])
def test_the_traced_step_gives_the_eager_tokens_and_traces_once(path, batch, dtype, monkeypatch):
    # Inductor's code generation takes minutes on 2 cores: benchmarks/generate.py checks the
    # inductor-compiled tokens; here the step is traced (dynamo + AOT autograd, no codegen).
    from torch._dynamo.utils import counters
    _use_path(monkeypatch, path)
    model = _model(dtype, num_layers=2)
    step = DecodeStep(model, compile=True, backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    assert step.prepare(batch_size=batch, cache_len=40) > 0
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, no break
    graphs = counters["stats"]["unique_graphs"]
    for prompt, new_tokens in (([7, 3, 9, 4], 10), ([2], 30)):  # both in one cache length
        prompts = [prompt, prompt[::-1] + [1], [9] + prompt][:batch]
        traced = generate(model, prompts, new_tokens, step=step)
        with monkeypatch.context() as patched:
            if dtype == torch.bfloat16:  # a bf16 row is summed, not torch.mv'd, when traced:
                patched.setattr(torch.compiler, "is_compiling", lambda: True)  # run as traced
            assert traced == generate(model, prompts, new_tokens)
    assert counters["stats"]["unique_graphs"] == graphs  # the prepared graphs served


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_compiled_step_replays_as_a_cuda_graph_with_the_eager_tokens():
    model = _model(torch.float32, num_layers=2).cuda()
    step = DecodeStep(model, compile=True)
    assert step.cuda_graphs
    prompts = [[7, 3, 9, 4], [2, 5], [9, 1, 1]]
    for new_tokens in (10, 30):  # a second generation: a new cache at the same shapes
        assert generate(model, prompts, new_tokens, step=step) == \
            generate(model, prompts, new_tokens)
