"""LoRA adapters that reach the experts (``--lora-rank R``).

A low-rank update W + (alpha / R) * B A on: the attention projections (q, k, v, o), the routed
experts, the shared experts, the dense layers' FFNs (a model with ``moe_every`` > 1), and with
``router=True`` the router. Everything
else is frozen: the optimizer holds the adapters alone. B starts at zero, so an adapted model
computes what its base does until it trains.

Routed experts get per-expert factors beside ``GroupedExperts``' stacked weights: for the input
projection [E, I, D] (I = 2F when gated: the gate's and the up projection's rows as one block,
as PEFT's ``target_parameters`` sees the fused ``gate_up_proj``) A [E, R, D] and B [E, I, R], and
for ``down_proj`` [E, D, F] A [E, R, F] and B [E, D, R]. They are applied with the same grouped
matmul over the same ``tokens_per_expert_E`` (no Python loop over experts), in
``LoRAExperts``, which keeps the experts contract and the base weights' names, so that
``adapter_weights`` and ``merged_weights`` name every tensor as a plain model does. Every
adapted product, dense or grouped, is one autograd step (``_LowRankProduct``), with the update
merged into the base weight where that is cheaper (``merging_pays``); the adapted weights that
read the same input (an attention block's q, k and v) compute together (``SharedInput``), and
the routed experts' two projections with the activation between them are one autograd step
(``_LowRankExpertMLP``).

Legend: N routed rows, D model dim, F expert FFN dim, I input projection's rows, E experts,
R rank.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from moekit.model.transformer import Transformer
from moekit.moe import GroupedExperts, MoELayer
from moekit.moe.experts import (ACTIVATION_FUNCTIONS, GATED_ACTIVATIONS, MLP,
                                 autocast_grouped_operands, copy_rows, expert_activation,
                                 grouped_linear, grouped_mm_supported, routed_expert_mlp)
from moekit.moe.row_products import Linear
from moekit.parallel.tensor_parallel import full_tensors, is_sharded

ADAPTER_FILE = "adapter.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # SharedInput's


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float | None = None  # default 2 * rank (a scale of 2)
    router: bool = False  # adapt the router too

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank {self.rank!r} is not allowed: expected an integer >= 1")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and self.alpha > 0):
            raise ValueError(f"LoRA alpha {self.alpha!r} is not allowed: expected a number > 0")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2 * self.rank) / self.rank


def _factors(*shape_pairs, dtype, device) -> list[nn.Parameter]:
    """(A, B) per pair of shapes, uninitialised (``initial_adapters`` draws them)."""
    return [nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            for pair in shape_pairs for shape in pair]


def _initial_factor(name: str, factor: torch.Tensor, seed: int) -> torch.Tensor:
    """A new adapter factor, whole, on the CPU: an A as nn.Linear initialises a weight
    (Kaiming uniform, as PEFT), a B zero."""
    whole = torch.zeros(factor.shape, dtype=factor.dtype)
    if name.endswith("lora_A"):
        # Drawn from its name and the seed: the same numbers however the model is laid out,
        # by any rank, without drawing the other adapters or the base weights first. (One
        # 32-bit number: the CPU generator, mt19937, keeps only 32 bits of its seed.)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        bound = factor.shape[-1] ** -0.5
        whole.uniform_(-bound, bound, generator=generator)
    return whole


def initial_adapters(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every adapter factor of ``model`` (which may be on the meta device) as ``add_adapters``
    initialises it from ``seed``, whole, by name."""
    return {name: _initial_factor(name, p, seed) for name, p in model.named_parameters()
            if "lora_" in name}


# A merged weight W + scale B A costs about three passes over the weights (formed in the
# forward, read again in the backward); the factors applied beside the base weight cost about
# four more passes over the rows' inputs and outputs, in small rank-R matmuls. Merging pays
# where the rows outweigh the weights by this factor.
MERGE_WHEN_ROWS_OUTWEIGH = 3


def merging_pays(rows: int, matrices: int, out_features: int, in_features: int) -> bool:
    """Whether ``rows`` rows, split over ``matrices`` [out, in] weights, multiply their base
    weights more cheaply merged with the low-rank update than beside it."""
    return (rows * (in_features + out_features)
            >= MERGE_WHEN_ROWS_OUTWEIGH * matrices * out_features * in_features)


def _rows_times_transposed(x_NX, w_OX, offsets_E):
    """x w^T: one weight [O, X] (``offsets_E`` None), or [E, O, X] per block of rows."""
    if offsets_E is None:
        return x_NX @ w_OX.t()
    return F.grouped_mm(x_NX, w_OX.transpose(1, 2), offs=offsets_E)


def _rows_times(g_NO, w_OX, offsets_E):
    """g w (the input gradient of ``_rows_times_transposed``)."""
    return g_NO @ w_OX if offsets_E is None else F.grouped_mm(g_NO, w_OX, offs=offsets_E)


def _weight_gradient(g_NO, x_NX, offsets_E):
    """g^T x: [O, X], or [E, O, X], one matrix per block of rows."""
    if offsets_E is None:
        return g_NO.t() @ x_NX
    return F.grouped_mm(g_NO.t(), x_NX, offs=offsets_E)


def _low_rank_forward(x_NX, weight, lora_A, lora_B, offsets_E, scale, merge, keep_low):
    """``_LowRankProduct``'s forward without autograd: y_NO, and what its backward
    (``_low_rank_backward``) reads: x_NX, the weight its products used, A, B, x A^T."""
    if merge:
        add_product = torch.addmm if weight.dim() == 2 else torch.baddbmm
        product_weight = add_product(weight, lora_B, lora_A, alpha=scale)
        y_NO = _rows_times_transposed(x_NX, product_weight, offsets_E)
        low_NR = _rows_times_transposed(x_NX, lora_A, offsets_E) if keep_low else None
    else:
        product_weight = weight
        y_NO = _rows_times_transposed(x_NX, weight, offsets_E)
        low_NR = _rows_times_transposed(x_NX, lora_A, offsets_E)
        y_NO += _rows_times_transposed(low_NR, lora_B * scale, offsets_E)
    return y_NO, (x_NX, product_weight, lora_A, lora_B, low_NR)


def _low_rank_backward(grad_NO, saved, offsets_E, scale, merge, needs):
    """The gradients (x, W, A, B; None where ``needs`` says no) of ``_low_rank_forward``'s
    output, from what it ``saved``."""
    x_NX, product_weight, lora_A, lora_B, low_NR = saved
    needs_x, needs_weight, needs_A, needs_B = needs
    grad_x = _rows_times(grad_NO, product_weight, offsets_E) if needs_x else None
    grad_low_NR = (_rows_times(grad_NO, lora_B * scale, offsets_E)
                   if needs_A or (needs_x and not merge) else None)
    grad_B = None
    if needs_B:  # as (low^T g)^T: with the rank on the output's rows, twice as fast on CPU
        grad_B = _weight_gradient(low_NR, grad_NO, offsets_E).mul_(scale).mT
    grad_weight = _weight_gradient(grad_NO, x_NX, offsets_E) if needs_weight else None
    if needs_x and not merge:
        grad_x += _rows_times(grad_low_NR, lora_A, offsets_E)
    grad_A = _weight_gradient(grad_low_NR, x_NX, offsets_E) if needs_A else None
    return grad_x, grad_weight, grad_A, grad_B


class _LowRankProduct(torch.autograd.Function):
    """y_NO = x W^T + scale (x A^T) B^T for one weight W [O, X], A [R, X], B [O, R]
    (``offsets_E`` None), or for stacked ones [E, O, X], [E, R, X], [E, O, R], block e of the
    rows through expert e's (``offsets_E[e]`` ends it). Legend: N rows, X in, O out, R rank.

    One autograd step: composed of autograd's ops, the low-rank branch cost the tiny preset
    more than full fine-tuning's weight gradient did (three products per projection each way,
    each output a new [N, O] or [N, X] tensor added to the base's, the scale one more pass).
    With ``merge`` (``merging_pays``) the base products, output and input gradient, use
    W + scale B A: the forward costs what the frozen one does plus x A^T, and the backward
    adds only the factors' own gradients. Otherwise the low-rank output is added to the
    base's. The scale multiplies the small factor B, never the rows' products; the base weight
    gets a gradient only where it trains.

    The rank-R products are small and bound by reading their [N, X] or [N, O] operand, so
    each is placed where that operand is in cache: x A^T right after the base product has
    read x (``keep_low``: kept for B's gradient, [N, R], R/O of the output's size), and in the
    backward the three products over the output gradient back to back, then A's gradient."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, offsets_E, scale, merge, keep_low):
        # Any leading dims (a dense layer's [B, S, X]): flattened here rather than by the
        # caller, whose view and its backward would be two more autograd steps per product.
        y_NO, saved = _low_rank_forward(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B,
                                        offsets_E, scale, merge, keep_low)
        ctx.save_for_backward(*saved, offsets_E)
        ctx.scale, ctx.merge, ctx.x_shape = scale, merge, x.shape
        return y_NO.view(*x.shape[:-1], y_NO.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        *saved, offsets_E = ctx.saved_tensors
        # (contiguous: grouped_mm rejects a stride-0 gradient)
        grad_NO = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x, grad_weight, grad_A, grad_B = _low_rank_backward(
            grad_NO, saved, offsets_E, ctx.scale, ctx.merge, ctx.needs_input_grad[:4])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_weight, grad_A, grad_B, None, None, None, None


def _product_plan(rows: int, weight, lora_B, offsets_E) -> tuple[bool, bool]:
    """(merge, keep_low) of a low-rank product over ``rows`` rows: ``merging_pays``, and
    whether B's gradient will need x A^T."""
    out_features, in_features = weight.shape[-2:]
    matrices = 1 if offsets_E is None else weight.shape[0]
    return (merging_pays(rows, matrices, out_features, in_features),
            torch.is_grad_enabled() and lora_B.requires_grad)


def _low_rank_product(x, weight, lora_A, lora_B, offsets_E, scale):
    """``_LowRankProduct`` of operands already in their compute dtype (autocast has no rule
    for a custom function: the callers cast as autocast casts their products)."""
    merge, keep_low = _product_plan(x.numel() // x.shape[-1], weight, lora_B, offsets_E)
    return _outside_autocast(_LowRankProduct, x, weight, lora_A, lora_B, offsets_E, scale,
                             merge, keep_low)


# out = grad * act'(x), written into ``out``, for each activation of ``ACTIVATION_FUNCTIONS``:
# the kernels autograd's backward of the activation runs.
_ACTIVATION_GRADIENTS = {
    "swiglu": lambda grad, x, out: torch.ops.aten.silu_backward.grad_input(grad, x,
                                                                            grad_input=out),
    "gelu": lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x,
                                                                          grad_input=out),
    "relu": lambda grad, x, out: torch.ops.aten.threshold_backward.grad_input(grad, x, 0,
                                                                               grad_input=out),
}
_ACTIVATION_GRADIENTS["geglu"] = _ACTIVATION_GRADIENTS["gelu"]


def _activation_backward(grad_a_NF, h_NI, act_gate_NF, activation: str) -> torch.Tensor:
    """h's gradient from a's, where a = act(gate) * up (``act_gate_NF`` = act(gate), gated)
    or act(h): gated, the gate's and the up projection's halves written in place in one
    [N, I] tensor, where autograd's backward of ``chunk`` concatenates them in a pass of its
    own."""
    derivative = _ACTIVATION_GRADIENTS[activation]
    grad_h_NI = torch.empty_like(h_NI)
    if act_gate_NF is None:
        return derivative(grad_a_NF, h_NI, grad_h_NI)
    gate_NF, up_NF = h_NI.chunk(2, dim=-1)
    grad_gate_NF, grad_up_NF = grad_h_NI.chunk(2, dim=-1)
    derivative(torch.mul(grad_a_NF, up_NF, out=grad_gate_NF), gate_NF, grad_gate_NF)
    torch.mul(grad_a_NF, act_gate_NF, out=grad_up_NF)
    return grad_h_NI


class _LowRankExpertMLP(torch.autograd.Function):
    """The routed experts' MLP with both projections adapted, as one autograd step: h_NI =
    x W_in'^T (``_low_rank_forward``, merged where ``merging_pays``), a_NF = act(gate) * up
    (or act(h) ungated), y_ND = a W_down'^T. Against two ``_LowRankProduct`` steps with the
    activation's autograd ops between them (five nodes and their saved tensors), the backward
    writes the gate's and the up projection's gradients into one tensor
    (``_activation_backward``) and runs one node. ``plans``: ``_product_plan`` of each
    projection; ``factors``: W_in, A_in, B_in, W_down, A_down, B_down."""

    @staticmethod
    def forward(ctx, x_ND, offsets_E, scale, activation, plans, *factors):
        h_NI, saved_in = _low_rank_forward(x_ND, *factors[:3], offsets_E, scale, *plans[0])
        act_gate_NF = None
        if activation in GATED_ACTIVATIONS:
            gate_NF, up_NF = h_NI.chunk(2, dim=-1)
            act_gate_NF = ACTIVATION_FUNCTIONS[activation](gate_NF)
            a_NF = act_gate_NF * up_NF
        else:
            a_NF = ACTIVATION_FUNCTIONS[activation](h_NI)
        y_ND, saved_down = _low_rank_forward(a_NF, *factors[3:], offsets_E, scale, *plans[1])
        ctx.save_for_backward(*saved_in, *saved_down, h_NI, act_gate_NF, offsets_E)
        ctx.scale, ctx.activation, ctx.merges = scale, activation, (plans[0][0], plans[1][0])
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        saved = ctx.saved_tensors
        # Each projection saved _low_rank_forward's five tensors: in, then down, then the rest.
        saved_in, saved_down = saved[:5], saved[5:10]
        h_NI, act_gate_NF, offsets_E = saved[10:]
        needs_x, needs_in, needs_down = (ctx.needs_input_grad[0], ctx.needs_input_grad[5:8],
                                         ctx.needs_input_grad[8:11])
        needs_h = needs_x or any(needs_in)
        # (contiguous: grouped_mm rejects a stride-0 gradient)
        grad_a_NF, *down_grads = _low_rank_backward(grad_ND.contiguous(), saved_down,
                                                    offsets_E, ctx.scale, ctx.merges[1],
                                                    (needs_h, *needs_down))
        in_grads = [None] * 4
        if needs_h:
            grad_h_NI = _activation_backward(grad_a_NF, h_NI, act_gate_NF, ctx.activation)
            in_grads = _low_rank_backward(grad_h_NI, saved_in, offsets_E, ctx.scale,
                                          ctx.merges[0], (needs_x, *needs_in))
        return in_grads[0], None, None, None, None, *in_grads[1:], *down_grads


def _outside_autocast(function: type[torch.autograd.Function], x: torch.Tensor, *operands):
    """``function.apply(x, *operands)`` with autocast off (its products would cast again)."""
    if not torch.is_autocast_enabled(x.device.type):
        return function.apply(x, *operands)
    with torch.autocast(x.device.type, enabled=False):
        return function.apply(x, *operands)


def _autocast_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """A dense adapted product's operands in the dtype autocast computes a linear in
    (unchanged without autocast)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    return [t.to(torch.get_autocast_dtype(device_type)) for t in tensors]


class _SharedInputProducts(torch.autograd.Function):
    """y_i = x W_i'^T for n weights that read the same input, each merged (W_i' = W_i + scale
    B_i A_i), with x [A_1; ...; A_n]^T formed in one product and kept for the B's gradients
    (``keep_low``). The backward is ``_LowRankProduct``'s merged one with the input gradient
    summed in place over the weights (no sums of autograd's) and one product for every A's
    gradient. Each output is a tensor of its own, not a column block of one product: what
    reads it (attention's heads) then hands back a gradient in its layout, where a block's
    came in another that took as long to copy as the products saved. ``factors``: W_1, A_1,
    B_1, W_2, ... (the Ws frozen). Legend: N rows, X in, O_i out, R the ranks together."""

    @staticmethod
    def forward(ctx, x, scale, keep_low, *factors):
        weights, lora_As, lora_Bs = factors[0::3], factors[1::3], factors[2::3]
        x_NX = x.reshape(-1, x.shape[-1])
        merged = [torch.addmm(weight, lora_B, lora_A, alpha=scale)
                  for weight, lora_A, lora_B in zip(weights, lora_As, lora_Bs)]
        outputs = [(x_NX @ weight.t()).view(*x.shape[:-1], -1) for weight in merged]
        low_NR = x_NX @ torch.cat(lora_As).t() if keep_low else None
        ctx.save_for_backward(x_NX, low_NR, *merged, *lora_Bs)
        ctx.scale, ctx.x_shape = scale, x.shape
        ctx.ranks = [lora_A.shape[0] for lora_A in lora_As]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x_NX, low_NR, *saved = ctx.saved_tensors
        merged, lora_Bs = saved[:len(grads)], saved[len(grads):]
        grads_NO = [grad.reshape(-1, grad.shape[-1]).contiguous() for grad in grads]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grads_NO[0] @ merged[0]
            for grad_NO, weight in zip(grads_NO[1:], merged[1:]):
                grad_x.addmm_(grad_NO, weight)
            grad_x = grad_x.view(ctx.x_shape)
        grad_lows, grad_Bs = [], []
        for grad_NO, lora_B, low_NRi in zip(grads_NO, lora_Bs, low_NR.split(ctx.ranks, dim=1)):
            grad_lows.append(grad_NO @ (lora_B * ctx.scale))
            grad_Bs.append((low_NRi.t() @ grad_NO).mul_(ctx.scale).mT)  # as _LowRankProduct
        grad_As = (torch.cat(grad_lows, dim=1).t() @ x_NX).split(ctx.ranks)
        per_weight = [grad for grads in zip([None] * len(grad_Bs), grad_As, grad_Bs)
                      for grad in grads]
        return grad_x, None, None, *per_weight


class SharedInput:
    """The adapted layers that read the same input (an attention block's q, k and v; an MLP's
    gate and up projections). The first of them called on an input computes every one's
    output (``_SharedInputProducts``) and keeps the others' for their calls on that same
    tensor: per attention block two products fewer in the forward, two A gradients and two
    sums of input gradients fewer in the backward, and one autograd step for three. Where it
    cannot take an input (``takes``), each layer computes its own."""

    def __init__(self, layers: list["LoRALinear"]):
        self.layers = layers
        self.pending: dict[int, torch.Tensor] = {}  # id(layer) -> its output
        self.source, self.version = None, None  # the input of the pending outputs

    def takes(self, x: torch.Tensor) -> bool:
        """Only the merged form (many rows), a frozen base on plain tensors, eagerly, and an
        input with a version counter (not an inference tensor)."""
        rows = x.numel() // x.shape[-1]
        return not (torch.compiler.is_compiling() or x.is_inference()) and all(
            layer.enabled and not layer.weight.requires_grad
            and (layer.lora_A.requires_grad and layer.lora_B.requires_grad
                 or not torch.is_grad_enabled())
            and not is_sharded(layer.weight)
            and merging_pays(rows, 1, *layer.weight.shape) for layer in self.layers)

    def output(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        if self.source is not x or self.version != x._version or id(layer) not in self.pending:
            self.pending = dict(zip(map(id, self.layers), self._outputs(x)))
            self.source, self.version = x, x._version
        y = self.pending.pop(id(layer))
        if not self.pending:
            self.source = None  # nothing pending: hold nothing
        return y

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        factors = _autocast_operands(x, *(t for layer in self.layers
                                         for t in (layer.weight, layer.lora_A, layer.lora_B)))
        return _outside_autocast(_SharedInputProducts, factors[0], self.layers[0].scale,
                                 torch.is_grad_enabled(), *factors[1:])


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update, holding the base layer's own weight and bias."""

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, scale: float) -> "LoRALinear":
        layer = cls.__new__(cls)  # not __init__: the base's own parameters, not new ones
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = base.in_features, base.out_features
        layer.weight, layer.bias = base.weight, base.bias
        layer.lora_A, layer.lora_B = _factors(
            ((rank, base.in_features), (base.out_features, rank)),
            dtype=base.weight.dtype, device=base.weight.device)
        layer.scale, layer.enabled = scale, True
        layer.shared_input = None  # a SharedInput, with the layers that read the same input
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.shared_input is not None and self.shared_input.takes(x):
            y = self.shared_input.output(self, x)
        else:
            y = _low_rank_product(*_autocast_operands(x, self.weight, self.lora_A, self.lora_B),
                                  None, self.scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def delta(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A

    def merged(self) -> nn.Linear:
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                       device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class LoRAExperts(GroupedExperts):
    """``GroupedExperts`` with per-expert low-rank updates of both projections."""

    @classmethod
    def wrap(cls, base: GroupedExperts, rank: int, scale: float) -> "LoRAExperts":
        experts = cls.__new__(cls)  # not __init__: the base's own weights, under their names
        nn.Module.__init__(experts)
        for name in ("num_experts", "hidden_size", "ffn_size", "activation", "gated"):
            setattr(experts, name, getattr(base, name))
        in_name = "gate_up_proj" if base.gated else "up_proj"
        experts.register_parameter(in_name, base.in_proj)
        experts.down_proj = base.down_proj
        e, i, d = base.in_proj.shape
        f = base.down_proj.shape[2]
        (experts.in_lora_A, experts.in_lora_B, experts.down_lora_A,
         experts.down_lora_B) = _factors(((e, rank, d), (e, i, rank)),
                                         ((e, rank, f), (e, d, rank)),
                                         dtype=base.in_proj.dtype, device=base.in_proj.device)
        experts.scale, experts.enabled = scale, True
        return experts

    def part(self, start: int, end: int) -> "LoRAExperts":
        """Experts [start, end) with their factors' rows (expert parallelism's share of a
        rank), under the same names."""
        part = LoRAExperts.wrap(super().part(start, end), self.in_lora_A.shape[1], self.scale)
        copy_rows(part, self, ("in_lora_A", "in_lora_B", "down_lora_A", "down_lora_B"), start,
                  end)
        part.enabled = self.enabled
        return part

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(x_ND, tokens_per_expert_E)
        operands = autocast_grouped_operands(x_ND, self.in_proj, self.in_lora_A, self.in_lora_B,
                                             self.down_proj, self.down_lora_A, self.down_lora_B)
        if (self.activation in _ACTIVATION_GRADIENTS and grouped_mm_supported(*operands)
                and not torch.compiler.is_compiling()):  # (grouped_linear runs eagerly there)
            offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
            plans = [_product_plan(len(x_ND), weight, lora_B, offsets_E)
                     for weight, lora_B in ((self.in_proj, self.in_lora_B),
                                            (self.down_proj, self.down_lora_B))]
            return _outside_autocast(_LowRankExpertMLP, operands[0], offsets_E, self.scale,
                                     self.activation, plans, *operands[1:])
        # No grouped_mm for these operands (float64, unaligned sizes), or compiling: the
        # update beside each base product, in autograd's ops.
        h_NI = self._composed_product(x_ND, self.in_proj, self.in_lora_A, self.in_lora_B,
                                      tokens_per_expert_E)
        return self._composed_product(expert_activation(h_NI, self.activation),
                                      self.down_proj, self.down_lora_A, self.down_lora_B,
                                      tokens_per_expert_E)

    def _composed_product(self, x_NX, weight, lora_A, lora_B, tokens_per_expert_E):
        low_NR = grouped_linear(x_NX, lora_A, tokens_per_expert_E) * self.scale
        return (grouped_linear(x_NX, weight, tokens_per_expert_E)
                + grouped_linear(low_NR, lora_B, tokens_per_expert_E))

    def forward_routes(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                       weights_TK: torch.Tensor) -> torch.Tensor:
        """The small-batch path (decoding a few tokens), each route through its expert's
        weights merged with its update; only the routed experts' are merged."""
        if not self.enabled:
            return super().forward_routes(x_TD, expert_ids_TK, weights_TK)
        used_U, routes_TK = expert_ids_TK.unique(return_inverse=True)
        in_UID, down_UDF = (
            torch.baddbmm(weight[used_U], lora_B[used_U], lora_A[used_U], alpha=self.scale)
            for weight, lora_A, lora_B in ((self.in_proj, self.in_lora_A, self.in_lora_B),
                                           (self.down_proj, self.down_lora_A, self.down_lora_B)))
        return routed_expert_mlp(x_TD, routes_TK, weights_TK, in_UID, down_UDF, self.activation)

    def deltas(self) -> dict[str, torch.Tensor]:
        in_name = "gate_up_proj" if self.gated else "up_proj"
        return {in_name: self.scale * self.in_lora_B @ self.in_lora_A,
                "down_proj": self.scale * self.down_lora_B @ self.down_lora_A}


class _LowRankDelta(nn.Module):
    """The router's update as a parametrization of its raw weight [E, D] (small: E rows)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float):
        super().__init__()
        self.lora_A, self.lora_B = _factors(((rank, weight.shape[1]), (weight.shape[0], rank)),
                                            dtype=weight.dtype, device=weight.device)
        self.scale, self.enabled = scale, True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * self.lora_B @ self.lora_A if self.enabled else weight


def _check_rank(name: str, shape, rank: int) -> None:
    if rank > min(shape[-2:]):
        raise ValueError(f"LoRA rank {rank} is larger than the layer {name} allows: its matrices "
                         f"are {shape[-2]} x {shape[-1]}, so the rank must be <= "
                         f"{min(shape[-2:])}")


def _targets(model: nn.Module, config: LoRAConfig):
    """(parent module, attribute, module) of everything that gets an adapter."""
    for module in model.modules():
        if hasattr(module, "q_proj"):  # an attention block (later CLA layers have no k, v)
            for name in ATTENTION:
                if hasattr(module, name):
                    yield module, name, getattr(module, name)
        if isinstance(module, MLP):  # a dense layer's FFN, or an MoE layer's shared experts
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(module, name) is not None:
                    yield module, name, getattr(module, name)
        if not isinstance(module, MoELayer):
            continue
        if not isinstance(module.experts, GroupedExperts):
            raise ValueError("LoRA reaches routed experts with stacked weights (GroupedExperts); "
                             f"this layer's experts are {type(module.experts).__name__}")
        yield module, "experts", module.experts
        if config.router:
            yield module, "router", module.router


def add_adapters(model: Transformer, config: LoRAConfig, seed: int = 0) -> None:
    """Put LoRA adapters on ``model`` (module docstring), initialised from ``seed``
    (``initial_adapters``; nothing is drawn on the meta device), and freeze everything
    else."""
    targets = list(_targets(model, config))
    for _, name, module in targets:
        shapes = ([module.in_proj.shape, module.down_proj.shape] if name == "experts"
                  else [module.weight.shape])
        for shape in shapes:
            _check_rank(name, shape, config.rank)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parent, name, module in targets:
        if name == "experts":
            setattr(parent, name, LoRAExperts.wrap(module, config.rank, config.scale))
        elif name == "router":
            parametrize.register_parametrization(
                module, "weight", _LowRankDelta(module.weight, config.rank, config.scale))
        else:
            setattr(parent, name, LoRALinear.wrap(module, config.rank, config.scale))
    for module in model.modules():
        for names in SHARED_INPUTS:
            layers = [getattr(module, name) for name in names
                      if isinstance(getattr(module, name, None), LoRALinear)]
            if len(layers) > 1:
                shared = SharedInput(layers)
                for layer in layers:
                    layer.shared_input = shared
    if not any(p.is_meta for p in model.parameters()):
        load_adapters(model, initial_adapters(model, seed))


def _adapted(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts,
                                                         _LowRankDelta))]


def has_adapters(model: nn.Module) -> bool:
    return bool(_adapted(model))


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model for the body (DPO's reference with LoRA: no second copy)."""
    adapted = _adapted(model)
    for module in adapted:
        module.enabled = False
    try:
        yield
    finally:
        for module in adapted:
            module.enabled = True


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their names in the adapted model, FSDP2's shards gathered (a
    collective then, every rank calls it); under expert parallelism the experts' factors are
    this rank's rows (``moekit.parallel.parallelize.whole_tensors`` gathers them)."""
    return {name: t.detach().contiguous() for name, t in full_tensors(
        {name: p for name, p in model.named_parameters() if "lora_" in name}).items()}


def check_adapters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse adapter ``tensors`` that are not ``model``'s adapters, by name."""
    if set(tensors) != {name for name, _ in model.named_parameters() if "lora_" in name}:
        raise ValueError(f"{ADAPTER_FILE}: its adapters do not match the model's LoRA settings")


def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    check_adapters(model, tensors)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


@torch.no_grad()
def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with every adapter merged into its weight."""
    state = {}
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if isinstance(module, LoRALinear):
            state[dot + "weight"] = module.weight + module.delta()
        elif isinstance(module, LoRAExperts):
            for name, delta in module.deltas().items():
                state[dot + name] = getattr(module, name) + delta
        elif parametrize.is_parametrized(module, "weight"):
            state[dot + "weight"] = module.weight  # the parametrization computes it merged
    for name, tensor in model.state_dict().items():
        if "lora_" not in name and "parametrizations" not in name:
            state.setdefault(name, tensor)
    return {name: t.detach().contiguous() for name, t in state.items()}


def merged_model(model: Transformer) -> Transformer:
    """A plain ``Transformer`` with the adapters merged in (``--merge-lora``, export)."""
    plain = Transformer(model.config).to(next(model.parameters()).device)
    plain.load_state_dict(merged_weights(model), strict=True)
    return plain.train(model.training)
