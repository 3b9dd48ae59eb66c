"""moefy (FastMoE's one-liner): replace the feed-forward blocks of any PyTorch model with MoE
layers, each expert a copy of the block it replaces (upcycling) or a fresh one.

It finds by itself moekit's dense Transformer (which then becomes an MoE Transformer, its
config updated: see ``upcycle``), the SwiGLU-style MLPs of Llama, Mistral, Qwen2 and their kin
(``gate_proj``/``up_proj``/``down_proj``) and GPT-2's MLP (``c_fc``/``c_proj``). Any other block
is named by ``ffn`` (a module type, or a regular expression over qualified module names) with
an ``FFNAdapter`` that says its width where moefy cannot read it.

In a model that is not moekit's, each block is replaced by an ``MoEFeedForward``: it returns a
tensor as the block did and keeps the statistics of its last forward, so that
``router_loss(model)`` gives the load-balancing loss to add to the training loss, and
``update_router_state(model)`` after each optimizer step moves the routers' state (the sigmoid
gate's bias, the adaptive coefficient, the recycle seed) from that forward's load. MLPs whose
activation moefy recognises (SiLU, GELU, ReLU, gated or not) and that have no biases become
fast ``GroupedExperts``; anything else becomes ``ModuleExperts`` of copies (one call per
expert: flexible, slower). Padding never counts there either: moefy hooks the model's forward
to read its ``attention_mask`` keyword (Hugging Face's convention, 1 = a real token), and every
block whose input is [batch, seq, hidden] routes only the real tokens (with a KV cache, the last
seq columns of the mask are the block's).
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.convert.upcycle import (fine_grained, init_router, upcycle, upcycle_from_mlp,
                                     with_noise)
from moekit.model import Transformer
from moekit.moe import MoELayer, MoEStats, ModuleExperts

INITS = ("copy", "fresh")


@dataclass(frozen=True)
class FFNAdapter:
    """How moefy reads a kind of feed-forward block it does not know."""

    hidden_size: Callable[[nn.Module], int]  # the width of the block's input (= its output)
    make_expert: Callable[[nn.Module], nn.Module] = copy.deepcopy  # one expert from the block


class TokenMask:
    """The ``attention_mask`` of the model forward under way, shared by its MoE blocks: the
    blocks sit deep inside a model whose own code never hands them the mask."""

    def __init__(self):
        self.mask_BL: torch.Tensor | None = None

    def capture(self, model, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.mask_BL = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def release(self, model, args, kwargs, output) -> None:
        self.mask_BL = None

    def for_block(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The valid-token mask of a block's [B, S, D] input, or None (every token counts)."""
        mask_BL = self.mask_BL
        if mask_BL is None or hidden.dim() != 3:
            return None
        (batch, columns), (rows, seq) = mask_BL.shape, hidden.shape[:2]
        if batch != rows or columns < seq:
            return None
        return mask_BL[:, columns - seq:].to(hidden.device).bool()


class MoEFeedForward(nn.Module):
    """An MoE layer standing in for a block that maps a tensor to a tensor; with a
    :class:`TokenMask`, padded tokens are not routed, computed or counted."""

    def __init__(self, layer: MoELayer, token_mask: TokenMask | None = None):
        super().__init__()
        self.moe = layer
        self.token_mask = token_mask
        self.last_stats: MoEStats | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = None if self.token_mask is None else self.token_mask.for_block(hidden)
        output, self.last_stats = self.moe(hidden, mask)
        return output


def moe_stats(model: nn.Module) -> list[MoEStats]:
    """The statistics of the last forward of every MoEFeedForward of ``model``, in order."""
    return [module.last_stats for module in model.modules()
            if isinstance(module, MoEFeedForward) and module.last_stats is not None]


def router_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the router losses of the last forward: add it to the training loss."""
    return sum((stats.router_loss for stats in moe_stats(model)), torch.zeros(()))


def update_router_state(model: nn.Module) -> None:
    """After an optimizer step of one forward: each MoE layer's router state moves from that
    forward's load (MoELayer.update_router_state)."""
    for module in model.modules():
        if isinstance(module, MoEFeedForward) and module.last_stats is not None:
            module.moe.update_router_state(module.last_stats.counts)


def _activation_of(mlp: nn.Module) -> str | None:
    """The MoEConfig activation an MLP computes, found by trying it (moekit's MLP keeps a
    function, transformers' MLPs a module of their own class); None when it is none of them."""
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None)
    if act is None:
        return None
    probe = torch.linspace(-3, 3, 13)
    with torch.no_grad():
        try:
            result = act(probe)
        except Exception:  # an activation that wants other input is not one of ours
            return None
    gated = getattr(mlp, "gate_proj", None) is not None
    candidates = {"swiglu": F.silu, "geglu": F.gelu} if gated else {"gelu": F.gelu,
                                                                    "relu": F.relu}
    for name, function in candidates.items():
        if torch.allclose(result, function(probe), rtol=0, atol=1e-6):
            return name
    return None


def _grouped_activation(module: nn.Module) -> str | None:
    """The activation of a bias-free gate/up/down MLP that GroupedExperts can hold, else None."""
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    present = [part for part in parts if part is not None]
    if (not all(isinstance(part, nn.Linear) for part in present) or parts[1] is None
            or parts[2] is None or any(part.bias is not None for part in present)):
        return None
    return _activation_of(module)


def _is_known_ffn(module: nn.Module) -> bool:
    gated_mlp = all(isinstance(getattr(module, n, None), nn.Linear) for n in ("up_proj",
                                                                             "down_proj"))
    gpt2_mlp = hasattr(module, "c_fc") and hasattr(module, "c_proj")
    return gated_mlp or gpt2_mlp


def _known_width(module: nn.Module) -> int:
    if hasattr(module, "c_fc"):  # GPT-2's Conv1D stores [in, out]
        return module.c_fc.weight.shape[0]
    linear = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ValueError(f"cannot read the width of {type(module).__name__}: it has no "
                         "nn.Linear; pass adapter=FFNAdapter(hidden_size=...)")
    return linear.in_features


def _matcher(ffn) -> Callable[[str, nn.Module], bool]:
    if ffn is None:
        return lambda name, module: _is_known_ffn(module)
    if isinstance(ffn, str):
        pattern = re.compile(ffn)
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(ffn, type) and issubclass(ffn, nn.Module):
        return lambda name, module: isinstance(module, ffn)
    raise ValueError(f"ffn={ffn!r} is not allowed: expected None (find the FFNs), an nn.Module "
                     "subclass, or a regular expression over module names")


def _find_ffns(model: nn.Module, matches) -> list[str]:
    """Qualified names of the matching modules, outermost only (a match is not searched)."""
    found = []
    for name, module in model.named_modules():
        if module is not model and matches(name, module) and not any(
                name.startswith(outer + ".") for outer in found):
            found.append(name)
    return found


@torch.no_grad()
def _redraw(weights, generator: torch.Generator) -> None:
    """Fresh experts: every matrix re-drawn from a normal law with the std of its copy."""
    for weight in weights:
        if weight.dim() >= 2:
            draw = torch.randn(weight.shape, generator=generator).to(weight.device)
            weight.copy_(draw * weight.float().std())


def _moe_for(block: nn.Module, config_options: dict, num_experts: int, top_k: int,
             adapter: FFNAdapter | None, init: str, granularity: int, noise_std: float,
             router_init_std: float | None, generator: torch.Generator) -> MoELayer:
    activation = None if adapter is not None else _grouped_activation(block)
    if activation is not None:
        width = block.up_proj.out_features
        config = fine_grained(MoEConfig(hidden_size=block.up_proj.in_features, ffn_size=width,
                                        num_experts=num_experts, top_k=top_k,
                                        activation=activation, **config_options),
                              width, granularity)
        layer = upcycle_from_mlp(config, block, granularity=granularity, noise_std=noise_std,
                                 router_init_std=router_init_std, generator=generator)
    else:
        if granularity != 1 or config_options.get("num_shared_experts"):
            raise ValueError(f"{type(block).__name__} becomes ModuleExperts (copies of the "
                             "block), which cannot be split (granularity) or shared; those "
                             "need a bias-free gate/up/down MLP")
        width = adapter.hidden_size(block) if adapter is not None else _known_width(block)
        make_expert = adapter.make_expert if adapter is not None else copy.deepcopy
        experts = ModuleExperts([make_expert(block) for _ in range(num_experts)])
        with torch.no_grad():
            for weight in experts.parameters():
                weight.copy_(with_noise(weight, noise_std, generator))
        config = MoEConfig(hidden_size=width, ffn_size=width, num_experts=num_experts,
                           top_k=top_k, **config_options)
        parameter = next(block.parameters())
        layer = MoELayer(config, experts=experts).to(parameter.device, parameter.dtype)
        init_router(layer, 1, router_init_std, generator)
    if init == "fresh":
        _redraw(layer.experts.parameters(), generator)
    return layer.train(block.training)


def moefy(model: nn.Module, num_experts: int, top_k: int = 2, *, ffn=None,
          adapter: FFNAdapter | None = None, init: str = "copy", inplace: bool = True,
          granularity: int = 1, noise_std: float = 0.0, seed: int = 0,
          router_init_std: float | None = None, **moe_options) -> nn.Module:
    """Replace the feed-forward blocks of ``model`` with MoE layers of ``num_experts`` experts,
    ``top_k`` per token, and return the model (``inplace=False``: a converted copy).

    ``init="copy"`` makes each expert a copy of the block (exact at initialisation, as
    ``upcycle``), ``"fresh"`` re-draws each expert's matrices at the scale of the block's.
    ``ffn`` and ``adapter`` name blocks moefy does not find itself; ``granularity``,
    ``noise_std``, ``router_init_std`` and ``seed`` are ``upcycle``'s; ``moe_options`` go to
    MoEConfig (router, capacity_factor, aux_loss, num_shared_experts, ...)."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not allowed: expected one of {', '.join(INITS)}")
    if isinstance(model, Transformer) and ffn is None:
        return _moefy_transformer(model, num_experts, top_k, init, inplace, granularity,
                                  noise_std, seed, router_init_std, moe_options)
    if not inplace:
        model = copy.deepcopy(model)
    names = _find_ffns(model, _matcher(ffn))
    if not names:
        raise ValueError(f"moefy found no feed-forward block in {type(model).__name__}; pass "
                         "ffn= a module type or a name pattern (and adapter= if needed)")
    generator = torch.Generator().manual_seed(seed)
    token_mask = TokenMask()
    # Bound methods: a deepcopy of the model copies the hooks and the blocks' TokenMask as one.
    model.register_forward_pre_hook(token_mask.capture, with_kwargs=True)
    model.register_forward_hook(token_mask.release, with_kwargs=True)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        block = model.get_submodule(name)
        layer = _moe_for(block, moe_options, num_experts, top_k, adapter, init, granularity,
                         noise_std, router_init_std, generator)
        setattr(model.get_submodule(parent_name), child, MoEFeedForward(layer, token_mask))
    return model


def _moefy_transformer(model: Transformer, num_experts, top_k, init, inplace, granularity,
                       noise_std, seed, router_init_std, moe_options) -> Transformer:
    """moekit's own dense Transformer: ``upcycle`` it, keeping the object when in place."""
    config = model.config
    moe = MoEConfig(hidden_size=config.hidden_size, ffn_size=config.ffn_size,
                    num_experts=num_experts, top_k=top_k, activation=config.activation,
                    **moe_options)
    converted = upcycle(model, moe, noise_std=noise_std, granularity=granularity, seed=seed,
                        router_init_std=router_init_std)
    if init == "fresh":
        generator = torch.Generator().manual_seed(seed)
        for module in converted.modules():
            if isinstance(module, MoELayer):
                _redraw(module.experts.parameters(), generator)
    if not inplace:
        return converted
    model.config, model.layers = converted.config, converted.layers
    return model
