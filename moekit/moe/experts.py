"""Experts: the dense MLP, many MLPs with stacked weights (the fast path), or any modules.

Legend: N routed rows (grouped by expert), D model dim, F expert FFN dim, I the input
projection's width (2F when gated, F otherwise), E experts; T tokens and K routes per token
for the decoding paths (``routed_expert_mlp``, ``dense_expert_mlp``).

Every experts module maps ``(x_ND, tokens_per_expert_E) -> y_ND``: the rows of expert 0 come
first, then those of expert 1, and so on, ``tokens_per_expert_E`` rows each.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.moe.row_products import Linear, linear

ACTIVATION_FUNCTIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}
GATED_ACTIVATIONS = ("swiglu", "geglu")


class MLP(nn.Module):
    """One feed-forward block with Hugging Face's names: down(act(gate(x)) * up(x)) when gated,
    down(act(up(x))) otherwise. The dense FFN, and the shared expert of an MoE layer."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str = "swiglu"):
        super().__init__()
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.gate_proj = (Linear(hidden_size, ffn_size, bias=False)
                          if activation in GATED_ACTIVATIONS else None)
        self.up_proj = Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_supported(x_NI: torch.Tensor, *weights_EOI: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes ``x_NI`` with each of these [E, out, in] weights, either
    way round (its backward multiplies by their transposes): fp32/bf16/fp16, and 16-byte
    aligned row strides."""
    if not hasattr(F, "grouped_mm") or x_NI.dtype not in (torch.float32, torch.bfloat16,
                                                          torch.float16):
        return False
    item = x_NI.element_size()
    return all(size * item % 16 == 0 for w_EOI in weights_EOI for size in w_EOI.shape[1:])


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient: grouped_mm's backward rejects the
    stride-0 gradient that, e.g., ``y.sum().backward()`` produces (torch 2.13)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def autocast_grouped_operands(x_NI: torch.Tensor,
                              *weights_EOI: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a grouped matmul in the dtype it computes in under autocast (unchanged
    without it). grouped_mm has no autocast rule (torch 2.13). On an accelerator, cast them as
    autocast casts a linear's: the experts are most of the FLOPs. On a CPU, keep the (first)
    weight's dtype: oneDNN compiles a bf16 kernel per row count, and the counts change every
    step, so bf16 experts train slower than fp32 ones there (docs/moe.md, Speed)."""
    device_type = x_NI.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x_NI, *weights_EOI)
    dtype = (weights_EOI[0].dtype if device_type == "cpu"
             else torch.get_autocast_dtype(device_type))
    return tuple(t.to(dtype) for t in (x_NI, *weights_EOI))


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def opaque_grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor,
                      offsets_E: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` as one operator that compiled code calls inside its graph, in every
    dtype its kernel takes: torch 2.13's own traces in bf16 only (its fake kernel refuses the
    fp32 that its CPU kernel takes). No autograd: for decoding."""
    return F.grouped_mm(x_NI, w_EIO, offs=offsets_E)


@opaque_grouped_mm.register_fake
def _(x_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor,
                   tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """y_NO: each block of rows through its expert's matrix as ``F.linear`` does (x @ w^T, the
    weight [out, in]), in one grouped call.

    The fallback (old torch builds, float64, unaligned sizes) multiplies block by block; its
    backward still builds each weight gradient once (unbind's backward stacks them)."""
    x_NI, w_EOI = autocast_grouped_operands(x_NI, w_EOI)
    w_EIO = w_EOI.transpose(1, 2)  # a view: grouped_mm reads the [out, in] memory as it is
    supported = grouped_mm_supported(x_NI, w_EIO)
    if torch.compiler.is_compiling() and x_NI.dtype != torch.bfloat16:
        # grouped_mm does not trace in this dtype: without autograd as our own operator,
        # inside the graph; with it eagerly, between two graphs.
        if supported and not torch.is_grad_enabled():
            return opaque_grouped_mm(x_NI, w_EIO, tokens_per_expert_E.cumsum(0).to(torch.int32))
        return _grouped_linear_eagerly(x_NI, w_EOI, tokens_per_expert_E)
    if supported:
        offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        return _DenseGradient.apply(F.grouped_mm(x_NI, w_EIO, offs=offsets_E))
    blocks = x_NI.split(tokens_per_expert_E.tolist())
    return torch.cat([block @ w_IO for block, w_IO in zip(blocks, w_EIO.unbind(0))])


_grouped_linear_eagerly = torch.compiler.disable(grouped_linear)


class GroupedExperts(nn.Module):
    """E MLP experts with stacked weights, computed with grouped matrix multiplication.

    Weights are contiguous [E, out, in] tensors, each expert's matrix in nn.Linear's order (and
    Hugging Face's): ``up_proj`` [E, F, D] or, when gated, ``gate_up_proj`` [E, 2F, D] (the
    gate's F rows, then the up projection's: one GEMM for both), and ``down_proj`` [E, D, F].
    The grouped matmul reads their transposes as views; on CPU this output-major order trains
    as fast as the input-major one in fp32 and faster in bf16, and decodes faster in fp32
    (docs/moe.md and docs/inference.md, Speed). Stored as plain contiguous tensors, sharding,
    ``.contiguous()`` and fused optimizers keep it. Initialised as E independent ``nn.Linear``s.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int,
                 activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        in_width = 2 * ffn_size if self.gated else ffn_size
        self.register_parameter("gate_up_proj" if self.gated else "up_proj",
                                nn.Parameter(torch.empty(num_experts, in_width, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))
        self.reset_parameters()

    @property
    def in_proj(self) -> nn.Parameter:
        """The input projection: gate_up_proj when gated, up_proj otherwise."""
        return self.gate_up_proj if self.gated else self.up_proj

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """nn.Linear's default (uniform, bound 1 / sqrt(fan_in)), or normal(0, std) when given.
        Drawn in [E, in, out] index order (as moekit always has), so that a seed gives the
        same experts as earlier versions and whatever the layout."""
        for weight_EOI in (self.in_proj, self.down_proj):
            draw_EIO = torch.empty(weight_EOI.transpose(1, 2).shape, dtype=weight_EOI.dtype,
                                   device=weight_EOI.device)
            if std is None:
                bound = 1 / math.sqrt(weight_EOI.shape[2])  # fan_in
                draw_EIO.uniform_(-bound, bound)
            else:
                draw_EIO.normal_(0, std)
            weight_EOI.copy_(draw_EIO.transpose(1, 2))

    def part(self, start: int, end: int) -> "GroupedExperts":
        """Experts [start, end) (expert parallelism's share of a rank), under the same names:
        the stacked tensors hold that block of rows, frozen where these are."""
        with torch.device("meta"):  # nothing drawn: the copy fills it
            part = GroupedExperts(end - start, self.hidden_size, self.ffn_size, self.activation)
        part = part.to_empty(device=self.in_proj.device).to(self.in_proj.dtype)
        copy_rows(part, self, ("in_proj", "down_proj"), start, end)
        return part

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x_ND, self.in_proj, self.down_proj, tokens_per_expert_E,
                          self.activation)

    def forward_routes(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                       weights_TK: torch.Tensor) -> torch.Tensor:
        """y_TD = sum over k of weights_TK[t, k] * expert expert_ids_TK[t, k](x_t), each route
        through its own expert's weights: the small-batch path (see ``routed_expert_mlp``)."""
        return routed_expert_mlp(x_TD, expert_ids_TK, weights_TK, self.in_proj,
                                 self.down_proj, self.activation)

    def forward_dense(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                      weights_TK: torch.Tensor) -> torch.Tensor:
        """The same sum as ``forward_routes``, every expert computed on every token and the
        routed products picked out: the mid-batch path (see ``dense_expert_mlp``)."""
        return dense_expert_mlp(x_TD, expert_ids_TK, weights_TK, self.in_proj, self.down_proj,
                                self.activation)


@torch.no_grad()
def copy_rows(part: nn.Module, whole: nn.Module, names, start: int, end: int) -> None:
    """Rows [start, end) of ``whole``'s stacked [E, ...] parameters ``names`` into ``part``'s,
    each trainable or frozen as its whole."""
    for name in names:
        mine, theirs = getattr(part, name), getattr(whole, name)
        mine.copy_(theirs[start:end])
        mine.requires_grad_(theirs.requires_grad)


def expert_activation(h_NI: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation between an expert's two projections; gated ones read the gate's F
    columns, then the up projection's."""
    act = ACTIVATION_FUNCTIONS[activation]
    if activation not in GATED_ACTIVATIONS:
        return act(h_NI)
    gate_NF, up_NF = h_NI.chunk(2, dim=-1)
    return act(gate_NF) * up_NF


def expert_mlp(x_ND: torch.Tensor, in_proj_EID: torch.Tensor, down_proj_EDF: torch.Tensor,
               tokens_per_expert_E: torch.Tensor, activation: str,
               in_scale_NI: torch.Tensor | None = None,
               down_scale_ND: torch.Tensor | None = None) -> torch.Tensor:
    """E expert MLPs given their stacked [E, out, in] weights: ``in_proj`` is [E, 2F, D] (gate
    then up) for gated activations, [E, F, D] otherwise. The optional scales multiply each
    row's output of the two projections (per-output-channel quantization scales, gathered per
    row)."""
    h_NI = grouped_linear(x_ND, in_proj_EID, tokens_per_expert_E)
    if in_scale_NI is not None:
        h_NI = h_NI * in_scale_NI
    y_ND = grouped_linear(expert_activation(h_NI, activation), down_proj_EDF,
                          tokens_per_expert_E)
    return y_ND if down_scale_ND is None else y_ND * down_scale_ND


def routed_expert_mlp(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                      in_proj_EID: torch.Tensor, down_proj_EDF: torch.Tensor,
                      activation: str) -> torch.Tensor:
    """Each token's K routes through their experts' weights one by one, gate-weighted and
    summed: the same function as the grouped path, for a handful of routes (decoding a few
    tokens), where sorting routes into groups costs more than the products themselves.

    Only the routed experts' weights are read. Eagerly, each route is one ``F.linear`` on its
    expert's [out, in] matrix, a view (gathering the matrices first would copy them), in bf16
    on a CPU one ``torch.mv`` (``row_products``). Under ``torch.compile`` the products are
    written as gathers multiplied and summed, which inductor fuses into one pass over the
    routed weights, with no Python number read from a tensor: the step keeps one graph."""
    num_tokens, top_k = expert_ids_TK.shape
    if torch.compiler.is_compiling():
        ids_N = expert_ids_TK.flatten()
        x_ND = x_TD.repeat_interleave(top_k, dim=0)
        h_NI = (in_proj_EID[ids_N] * x_ND[:, None, :]).sum(-1)
        y_ND = (down_proj_EDF[ids_N] * expert_activation(h_NI, activation)[:, None, :]).sum(-1)
    else:
        y_ND = torch.stack([
            linear(expert_activation(linear(x_TD[route // top_k], in_proj_EID[expert]),
                                     activation), down_proj_EDF[expert])
            for route, expert in enumerate(expert_ids_TK.flatten().tolist())])
    return weighted_route_sum(y_ND.view(num_tokens, top_k, -1), weights_TK)


def dense_expert_mlp(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                     in_proj_EID: torch.Tensor, down_proj_EDF: torch.Tensor,
                     activation: str) -> torch.Tensor:
    """Every expert on every token, then each token's K routed outputs picked out,
    gate-weighted and summed: the same function as the grouped path, for a few dozen tokens
    (decoding a batch of sequences) whose routes reach every expert anyway.

    Each expert's weights are read once, as at the grouped path, but in two products whose
    shapes depend on T alone: the input projection of all experts as one matrix [E * I, D]
    (a view), the output projections as one batched product. No sort, no per-expert row
    counts: nothing is read back to the host and a compiled step keeps one graph in every
    dtype (the grouped matmul traces in bf16 only). The products of the (token, expert) pairs
    that were not routed, E / K - 1 times the routed work, are the price; while T is small the
    weights' memory traffic, the same on both paths, hides them (``MoELayer``'s
    ``DENSE_BATCH_ROWS``)."""
    num_tokens, num_experts = x_TD.shape[0], in_proj_EID.shape[0]
    # The weights the left operands, in their own [out, in] layout, and the tokens' columns
    # the right ones: for a few rows faster than x W^T (``moekit.moe.row_products``).
    h_EIT = (in_proj_EID.flatten(0, 1) @ x_TD.t()).view(num_experts, -1, num_tokens)
    a_EFT = expert_activation(h_EIT.transpose(1, 2), activation).transpose(1, 2)
    y_EDT = torch.bmm(down_proj_EDF, a_EFT)
    return routed_outputs(y_EDT.transpose(1, 2), expert_ids_TK, weights_TK)


def routed_outputs(y_ETD: torch.Tensor, expert_ids_TK: torch.Tensor,
                   weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD from every expert's output on every token: each token's K routed ones picked out,
    gate-weighted and summed."""
    token_T1 = torch.arange(y_ETD.shape[1], device=y_ETD.device)[:, None]
    return weighted_route_sum(y_ETD[expert_ids_TK, token_T1], weights_TK)


def weighted_route_sum(y_TKD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD: each token's K route outputs times their gate weights, summed in route order."""
    return (y_TKD * weights_TK.to(y_TKD.dtype)[..., None]).sum(1)


class ModuleExperts(nn.Module):
    """Experts made of any modules that map [n, D] -> [n, D] (FastMoE's flexibility): a conv,
    an attention block, experts of different widths. Slower than GroupedExperts: one call per
    expert."""

    def __init__(self, experts: list[nn.Module] | nn.ModuleList):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("ModuleExperts needs at least one expert module, got an empty list")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def part(self, start: int, end: int) -> "ModuleExperts":
        """Experts [start, end) (expert parallelism's share of a rank), each module under its
        number in the whole layer (``ExpertsNumberedFrom``)."""
        part = ModuleExperts(list(self.experts)[start:end])
        part.experts = ExpertsNumberedFrom(start, part.experts)
        return part

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        blocks = x_ND.split(tokens_per_expert_E.tolist())
        return torch.cat([expert(block) for expert, block in zip(self.experts, blocks)])


class ExpertsNumberedFrom(nn.Module):
    """Experts [first, first + n) of a layer's ``ModuleExperts``, each under its number in the
    whole layer (``experts.5.weight`` on the rank holding expert 5): a parameter's name is the
    one process's, whatever the layout. Iterated in order, as the ``nn.ModuleList`` it stands
    for."""

    def __init__(self, first: int, modules):
        super().__init__()
        for number, module in enumerate(modules, start=first):
            self.add_module(str(number), module)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


def expert_weight_rows(experts: nn.Module) -> torch.Tensor | None:
    """Each expert's weights as one row [E, P] (input projection, then output projection), to
    compare experts with each other; None for ModuleExperts whose experts differ in size."""
    if isinstance(experts, GroupedExperts):
        return torch.cat([experts.in_proj.detach().flatten(1),
                          experts.down_proj.detach().flatten(1)], 1)
    if isinstance(experts, ModuleExperts):
        rows = [torch.cat([p.detach().flatten() for p in expert.parameters()]
                          or [torch.zeros(0)]) for expert in experts.experts]
        if len({row.numel() for row in rows}) == 1 and rows[0].numel() > 0:
            return torch.stack(rows)
    return None
