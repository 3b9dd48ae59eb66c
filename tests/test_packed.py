"""Decoding on packed weights (``moekit.moe.packed``, ``moekit.model.packed``): the products of
a float64 reference for every row count, the plain engine's greedy tokens eagerly and traced in
one graph, and a packed model that cannot train."""
import copy

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer
from moekit.config import ModelConfig
from moekit.model import Transformer, generate
from moekit.model.decode_step import DecodeStep
from moekit.model.packed import pack_for_decoding
from moekit.moe import layer as moe_layer
from moekit.moe.packed import PackedExperts, PackedLinear, PackedWeight, packable, packed_linear
from reference import moe_forward

DTYPES = [torch.float32] + ([torch.bfloat16] if packable(torch.zeros(1, 1).bfloat16()) else [])
# Each output within a few roundings of its dtype (8 significant bits in bf16, 24 in fp32).
TOLERANCE = {torch.float32: 2 ** -18, torch.bfloat16: 2 ** -6}


def _close(y, exact, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tol, atol=tol * exact.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hint", [1, 16])
@torch.no_grad()
def test_packed_products_are_float64_products_for_1_to_16_rows(dtype, hint):
    weight, bias = torch.randn(80, 48).to(dtype), torch.randn(80).to(dtype)
    packed = PackedWeight(weight, hint)
    for rows in (1, 2, 3, 4, 8, 16):
        x = torch.randn(rows, 1, 48).to(dtype)  # [B, S, D], as decoding multiplies
        y = packed_linear(x, packed, bias)
        assert y.shape == (rows, 1, 80) and y.dtype == dtype
        _close(y, F.linear(x.double(), weight.double(), bias.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_packed_experts_are_the_route_by_route_loop_on_both_paths(dtype, monkeypatch):
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=24, num_experts=6, top_k=2))
    layer.experts.reset_parameters(0.2)
    layer = layer.to(dtype).eval()
    x_TD = torch.randn(16, 32).to(dtype)
    routing = layer.router(x_TD)  # token by token: the first rows route as they would alone
    loop = moe_forward(copy.deepcopy(layer).double(), x_TD.double(), routing.expert_ids_TK,
                       routing.weights_TK.double())
    layer.experts = PackedExperts(layer.experts, rows=16)
    _close(layer.experts.forward_dense(x_TD, routing.expert_ids_TK, routing.weights_TK), loop,
           dtype)
    dense_calls = []
    dense = layer.experts.forward_dense
    layer.experts.forward_dense = lambda *a: dense_calls.append(1) or dense(*a)
    y, _ = layer(x_TD)  # 16 tokens: the mid-batch path in bf16 (as plain experts take it)
    assert len(dense_calls) == (dtype == torch.bfloat16)
    _close(y, loop, dtype)
    monkeypatch.setattr(moe_layer, "DENSE_BATCH_ROWS", 0)  # the grouped path
    for rows in (16, 3, 1):  # at 3 and 1 tokens some experts get no rows
        y, stats = layer(x_TD[:rows])
        _close(y, loop[:rows], dtype)
        assert int(stats.tokens_per_expert_E.sum()) == 2 * rows


def _model(dtype=torch.float32, **kw):
    base = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_size=48, max_seq_len=256, qkv_bias=True,
                moe=MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, top_k=2,
                              num_shared_experts=1))
    base.update(kw)
    model = Transformer(ModelConfig(**base)).to(dtype).eval()
    model.reset_parameters(std=0.3)  # sharp logits: greedy tokens vary from step to step
    return model


PROMPTS = [[7, 3, 9, 4], [2], [5, 8, 1, 1, 6, 2], [4, 4]] * 4  # 16 rows, mixed lengths


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_packed_decoding_gives_the_plain_engines_greedy_tokens(batch):
    model = _model()
    plain = generate(model, PROMPTS[:batch], 12)
    packed = pack_for_decoding(copy.deepcopy(model), rows=batch)
    swapped = [m for m in packed.modules() if isinstance(m, (PackedLinear, PackedExperts))]
    assert len(swapped) == 2 * (4 + 3 + 1) + 1  # q k v o, shared expert's 3, experts; head
    assert generate(packed, PROMPTS[:batch], 12) == plain


def test_the_traced_packed_step_gives_the_eager_tokens_in_one_graph(monkeypatch):
    # Traced (dynamo + AOT autograd, no code generation): the packed products are operators
    # of ours inside the graph, on the grouped path (float32) and the mid-batch one (bf16's,
    # here taken in float32 too).
    from torch._dynamo.utils import counters
    monkeypatch.setattr(moe_layer, "DENSE_BATCH_DTYPES", (torch.float32,))
    for dense_rows in (0, moe_layer.DENSE_BATCH_ROWS):
        monkeypatch.setattr(moe_layer, "DENSE_BATCH_ROWS", dense_rows)
        model = pack_for_decoding(_model(), rows=16)
        eager = generate(model, PROMPTS, 10)
        step = DecodeStep(model, compile=True, backend="aot_eager")
        graphs = counters["stats"]["unique_graphs"]
        assert generate(model, PROMPTS, 10, step=step) == eager
        assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, no break


def test_a_packed_model_cannot_train_and_is_not_silently_stale():
    model = _model()
    packed = pack_for_decoding(copy.deepcopy(model), rows=4)
    names = {name for name, _ in packed.named_parameters()}
    # What stays a parameter: embeddings, norms, routers; no packed matrix is one, so no
    # optimizer can move a weight behind its packed copy.
    assert names and all(n.endswith(("embed_tokens.weight", "norm.weight", "router.weight"))
                         for n in names), names
    with pytest.raises(RuntimeError, match="packed weights are for inference"):
        packed(torch.tensor([[1, 2, 3]]))  # autograd on: a training forward
    with pytest.raises(RuntimeError, match="Unexpected key"):
        packed.load_state_dict(model.state_dict())  # the plain weights have nowhere to go


def test_packing_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="rows=0 is not allowed"):
        pack_for_decoding(_model(), rows=0)
    with pytest.raises(ValueError, match="nothing in this model can be packed"):
        pack_for_decoding(_model(torch.float64), rows=4)
    with pytest.raises(ValueError, match="cannot be packed"):
        PackedWeight(torch.zeros(4, 4, dtype=torch.float64), 4)
