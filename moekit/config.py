"""Configuration dataclasses, checked when built.

This is the lowest layer of moekit: every module may import it and it imports nothing of moekit.
A bad value raises a ValueError that names the field, the value and what is allowed, so that a
mistake is caught here rather than deep inside a kernel.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

# The built-in gates, by name (moekit/moe/router.py builds them; docs/moe.md has the formulas).
ROUTERS = ("softmax", "switch", "sigmoid", "zero", "noisy", "gshard", "base", "sinkhorn",
           "swipe", "topology")  # the last two route over ranks (moe/gates_distributed.py)
# How far a capacity counts: this rank's batch, or every rank's (moekit/moe/route_groups.py).
CAPACITY_SCOPES = ("local", "ranks", "step")
# Gates that form a balancing loss of their own: the layer's aux_loss would count it twice.
ROUTERS_WITH_OWN_LOSS = ("noisy", "gshard")
# Gates that balance by the assignment itself (BASE layers, S-BASE) and take no balancing loss.
ROUTERS_BALANCED_BY_ASSIGNMENT = ("base", "sinkhorn")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
OVERFLOW_POLICIES = ("drop", "recycle_random", "recycle_next_best")
AUX_LOSSES = ("switch", "skywork", "none")
# Where QK-norm (qk_norm=True) normalises queries and keys; the families differ, and each
# placement gives other logits from the same weights. "head": each head before RoPE (Qwen3-MoE,
# Hunyuan-Large); "head_after_rope": each head after RoPE (transformers' HunYuan-MoE-V1);
# "projection": the whole q and k projections before they are split into heads (OLMoE).
QK_NORM_PLACEMENTS = ("head", "head_after_rope", "projection")
# The scaled RoPE kinds, each with the keys its rope_scaling needs besides rope_type.
ROPE_SCALING_TYPES = {"linear": ("factor",),
                      "dynamic": ("factor", "original_max_position_embeddings"),
                      "yarn": ("factor", "original_max_position_embeddings"),
                      "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                                 "high_freq_factor")}


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}")


def _positive_int(field: str, value) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             field, value, "expected a positive integer")


def _non_negative(field: str, value) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool)
             and math.isfinite(value) and value >= 0, field, value, "expected a finite number >= 0")


def _positive_number(field: str, value) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool)
             and math.isfinite(value) and value > 0, field, value, "expected a finite number > 0")


def _capacity(field: str, value) -> None:
    _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and math.isfinite(value) and value > 0),
             field, value, "expected a number > 0, or None for dropless routing")


def _check_keys(cls, values: dict, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {sorted(known)}")


class _FromDict:
    """``from_dict``: a config from a mapping, unknown keys named in the error."""

    _kind = "config"  # how errors name this config

    @classmethod
    def from_dict(cls, values: dict):
        _check_keys(cls, values, cls._kind)
        return cls(**values)


@dataclass(frozen=True)
class MoEConfig(_FromDict):
    """One MoE feed-forward layer: router, capacity, losses, routed and shared experts.

    Defaults follow Mixtral: softmax top-2 with the two weights renormalised, dropless, SwiGLU.
    """

    _kind = "MoE"

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int = 2
    # Router. "softmax": softmax over all experts, top-k. "switch": top-1 of the softmax, the
    # gate value not renormalised (Switch Transformer). "sigmoid": sigmoid scores, top-k chosen
    # by score + a per-expert bias that is nudged towards balance (DeepSeek-V3, no aux loss).
    # "zero", "noisy", "gshard": FastMoE's other gates; "base", "sinkhorn": BASE layers' balanced
    # assignment and its Sinkhorn estimate (docs/moe.md).
    router: str = "softmax"
    # Options of the chosen gate, by name (e.g. {"bias": True}). Each gate checks its own when
    # it is built, since config.py cannot import the gates; an unknown name is refused there.
    router_options: dict = field(default_factory=dict)
    normalize_weights: bool = True  # rescale the k chosen weights to sum to 1
    logit_norm_scale: float | None = None  # Skywork gating-logit normalization lambda; None = off
    jitter: float = 0.0  # training only: input scaled by U(1 - jitter, 1 + jitter) before routing
    bias_update_rate: float = 1e-3  # sigmoid router: step of the balancing bias per training forward
    # Capacity: None = dropless. Capacity per expert = ceil(factor * k * valid_tokens / E).
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # evaluation and generation are dropless by default
    overflow: str = "drop"  # what happens to an assignment over capacity
    # Over which batch a capacity counts: "local" this rank's, "ranks" every data- and
    # expert-parallel rank's micro-batch together (FastMoE's DCGate; drops only), "step" the
    # training step's global batch (moekit.train.step_capacity; drops only).
    capacity_scope: str = "local"
    seed: int = 0  # seeds recycle_random, so that a run can be repeated exactly
    # Losses: aux_loss picks the load-balancing form; its coefficient is fixed unless adaptive.
    aux_loss: str = "switch"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    adaptive_aux: bool = False  # Skywork: coefficient driven by the layer's measured drop rate
    adaptive_xi: float = 0.2
    adaptive_max: float = 1e-2
    adaptive_beta: float = 0.99
    # Experts.
    activation: str = "swiglu"
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None  # width of each shared expert; default ffn_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(w . x) scales the shared output

    def __post_init__(self):
        for name in ("hidden_size", "ffn_size", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        _require(self.top_k <= self.num_experts, "top_k", self.top_k,
                 f"must be <= num_experts ({self.num_experts})")
        _require(self.router in ROUTERS, "router", self.router, f"one of {', '.join(ROUTERS)}")
        _require(self.router != "switch" or self.top_k == 1, "top_k", self.top_k,
                 'the "switch" router routes each token to exactly 1 expert (top_k=1)')
        _require(self.router != "gshard" or self.top_k == 2, "top_k", self.top_k,
                 'the "gshard" router routes each token to 2 experts (top_k=2)')
        _require(self.router not in ROUTERS_WITH_OWN_LOSS or self.aux_loss == "none",
                 "aux_loss", self.aux_loss, f'the "{self.router}" router forms its own balancing '
                 'loss (weighted by its router_options): set aux_loss="none"')
        _require(self.router != "base" or self.top_k == 1, "top_k", self.top_k,
                 'the "base" router assigns each token to exactly 1 expert (top_k=1)')
        _require(self.router not in ROUTERS_BALANCED_BY_ASSIGNMENT or self.aux_loss == "none",
                 "aux_loss", self.aux_loss, f'the "{self.router}" router balances by its '
                 'assignment and takes no balancing loss: set aux_loss="none"')
        _require(self.router != "gshard" or self.overflow == "drop", "overflow", self.overflow,
                 'the "gshard" router applies its own capacity and drops what is over it '
                 '(overflow="drop")')
        _require(isinstance(self.router_options, dict)
                 and all(isinstance(name, str) for name in self.router_options),
                 "router_options", self.router_options, "expected a dict of option names to values")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"one of {', '.join(ACTIVATIONS)}")
        _require(self.overflow in OVERFLOW_POLICIES, "overflow", self.overflow,
                 f"one of {', '.join(OVERFLOW_POLICIES)}")
        _require(self.aux_loss in AUX_LOSSES, "aux_loss", self.aux_loss,
                 f"one of {', '.join(AUX_LOSSES)}")
        _capacity("capacity_factor", self.capacity_factor)
        _require(self.capacity_scope in CAPACITY_SCOPES, "capacity_scope", self.capacity_scope,
                 f"one of {', '.join(CAPACITY_SCOPES)}")
        _require(self.capacity_scope == "local" or self.overflow == "drop", "overflow",
                 self.overflow, f'capacity_scope="{self.capacity_scope}" drops the routes over '
                 'capacity (overflow="drop"): recycling into another rank\'s free slots is not '
                 'in this version')
        _capacity("eval_capacity_factor", self.eval_capacity_factor)
        _require(self.logit_norm_scale is None or (isinstance(self.logit_norm_scale, (int, float))
                                                   and self.logit_norm_scale > 0),
                 "logit_norm_scale", self.logit_norm_scale, "expected a number > 0, or None (off)")
        _require(self.logit_norm_scale is None or self.num_experts > 1, "logit_norm_scale",
                 self.logit_norm_scale, "needs num_experts > 1 (the std over one expert is 0)")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "bias_update_rate",
                     "adaptive_xi", "adaptive_max"):
            _non_negative(name, getattr(self, name))
        _require(self.jitter < 1, "jitter", self.jitter, "expected a number in [0, 1)")
        _require(isinstance(self.adaptive_beta, (int, float)) and 0 <= self.adaptive_beta < 1,
                 "adaptive_beta", self.adaptive_beta, "expected a number in [0, 1)")
        _require(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
                 "num_shared_experts", self.num_shared_experts, "expected an integer >= 0")
        if self.shared_ffn_size is not None:
            _positive_int("shared_ffn_size", self.shared_ffn_size)
        _require(isinstance(self.seed, int), "seed", self.seed, "expected an integer")


@dataclass(frozen=True)
class MLAConfig(_FromDict):
    """Multi-head latent attention (MLA, DeepSeek-V2/V3): keys and values of every head come
    from one low-rank latent of ``kv_lora_rank`` numbers per token (RMS-normed, then expanded by
    ``kv_b_proj``), and one RoPE key of ``qk_rope_head_dim`` numbers is shared over all heads
    (the "decoupled" RoPE part). Each head's query and key are its ``qk_nope_head_dim``
    position-free numbers followed by ``qk_rope_head_dim`` rotated ones; its value has
    ``v_head_dim``. Queries come from a latent of ``q_lora_rank`` too, or (None) straight from
    the hidden state. The KV cache holds the latent and the RoPE key only."""

    _kind = "MLA"

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int("q_lora_rank", self.q_lora_rank)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig(_FromDict):
    """A decoder-only Transformer: RMSNorm, RoPE, grouped-query attention, cross-layer
    attention (CLA), and MoE feed-forward blocks (``moe``; None gives the dense model)."""

    _kind = "model"

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int  # width of the dense FFN (dense layers and the dense variant)
    num_kv_heads: int | None = None  # GQA; default num_heads (MHA)
    head_dim: int | None = None  # default hidden_size // num_heads
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    activation: str = "swiglu"  # of the dense FFN
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-MoE
    qk_norm: bool = False  # Qwen3-MoE, Hunyuan-Large: RMSNorm on each head's q and k
    qk_norm_placement: str = "head"  # one of QK_NORM_PLACEMENTS
    cla_share: int = 1  # CLA: every cla_share adjacent layers share one K/V (Hunyuan: 2)
    # RoPE scaling as transformers' rope_parameters spell it (without rope_theta: rope_base),
    # e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096};
    # None: plain RoPE. moekit.model.rope computes each of ROPE_SCALING_TYPES.
    rope_scaling: dict | None = None
    attention_out_bias: bool = False  # a bias on the attention output projection (o_proj)
    # Each query attends to at most this many positions, its own included (Mistral); None: all.
    sliding_window: int | None = None
    full_attention_layers: tuple[int, ...] = ()  # layers that attend past sliding_window
    # GraniteMoE's scalings (the defaults leave the model as it is): embeddings times
    # embedding_multiplier; each attention and FFN output times residual_multiplier before it is
    # added to the residual stream; attention scores times attention_multiplier (None:
    # 1/sqrt(head_dim)); logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    moe: MoEConfig | None = None
    moe_every: int = 1  # layer i has an MoE FFN when (i + 1) % moe_every == 0 ...
    # ... and i is not one of these dense layers (Qwen's mlp_only_layers, DeepSeek's first
    # first_k_dense_replace layers); held sorted, without repeats.
    dense_layers: tuple[int, ...] = ()
    # Multi-head latent attention instead of grouped-query attention (None: GQA); the GQA
    # fields num_kv_heads, head_dim, qkv_bias, qk_norm and cla_share then stay at their defaults.
    mla: MLAConfig | None = None
    # RoPE rotates the first rotary_dim numbers of each head and leaves the rest as they are
    # (GLM4-MoE: half); None: the whole head (MLA: its qk_rope_head_dim part).
    rotary_dim: int | None = None
    # Dropout in training only (Hunyuan-Large's SFT: 0.1 and 0.2): of the attention
    # probabilities, and of each attention and FFN output before it joins the residual stream.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                     "max_seq_len", "cla_share", "moe_every"):
            _positive_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            _positive_int("num_kv_heads", self.num_kv_heads)
            _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                     f"must divide num_heads ({self.num_heads})")
        if self.head_dim is None and self.mla is None:
            _require(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
                     f"must divide hidden_size ({self.hidden_size}) unless head_dim is set")
        elif self.head_dim is not None:
            _positive_int("head_dim", self.head_dim)
        if self.mla is not None:
            _require(isinstance(self.mla, MLAConfig), "mla", self.mla, "expected an MLAConfig")
            for name, default in (("num_kv_heads", None), ("head_dim", None), ("qkv_bias", False),
                                  ("qk_norm", False), ("cla_share", 1), ("rotary_dim", None),
                                  ("attention_out_bias", False)):
                _require(getattr(self, name) == default, name, getattr(self, name),
                         f"multi-head latent attention (mla) takes no {name}: leave it {default}")
        if self.rotary_dim is not None:
            _positive_int("rotary_dim", self.rotary_dim)
            _require(self.rotary_dim <= self.attention_head_dim, "rotary_dim", self.rotary_dim,
                     f"must be <= the head dim ({self.attention_head_dim})")
        _require(self.rope_dim % 2 == 0, "rotary_dim" if self.mla is None else "qk_rope_head_dim",
                 self.rope_dim, "must be even (RoPE rotates pairs)")
        _require(isinstance(self.rope_base, (int, float)) and self.rope_base > 1, "rope_base",
                 self.rope_base, "expected a number > 1")
        _require(isinstance(self.norm_eps, float) and self.norm_eps > 0, "norm_eps",
                 self.norm_eps, "expected a float > 0")
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"one of {', '.join(ACTIVATIONS)}")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            _positive_number(name, getattr(self, name))
        if self.attention_multiplier is not None:
            _positive_number("attention_multiplier", self.attention_multiplier)
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0 <= value < 1, name, value,
                     "expected a number in [0, 1)")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.rope_scaling is not None:
            kind = (self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict)
                    else None)
            _require(kind in ROPE_SCALING_TYPES, "rope_scaling", self.rope_scaling,
                     f"a dict whose rope_type is one of {', '.join(ROPE_SCALING_TYPES)}")
            absent = [key for key in ROPE_SCALING_TYPES[kind] if key not in self.rope_scaling]
            _require(not absent, "rope_scaling", self.rope_scaling,
                     f"{kind} scaling needs {', '.join(ROPE_SCALING_TYPES[kind])}")
        _require(self.qk_norm_placement in QK_NORM_PLACEMENTS, "qk_norm_placement",
                 self.qk_norm_placement, f"one of {', '.join(QK_NORM_PLACEMENTS)}")
        for name in ("dense_layers", "full_attention_layers"):
            self._hold_layer_indices(name)
        _require(self.moe is None or self.moe.hidden_size == self.hidden_size, "moe.hidden_size",
                 None if self.moe is None else self.moe.hidden_size,
                 f"must equal hidden_size ({self.hidden_size})")

    def _hold_layer_indices(self, name: str) -> None:
        value = getattr(self, name)
        _require(isinstance(value, (list, tuple, set, frozenset)) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers
            for i in value), name, value,
            f"expected a collection of layer indices in [0, {self.num_layers})")
        # A list (as JSON gives it) becomes the sorted, hashable tuple the field holds.
        object.__setattr__(self, name, tuple(sorted(set(value))))

    def uses_window(self, index: int) -> bool:
        return self.sliding_window is not None and index not in self.full_attention_layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rope_dim(self) -> int:
        """How many numbers of each query and key head RoPE rotates."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return self.rotary_dim or self.attention_head_dim

    @property
    def kv_groups(self) -> int:
        """The layers that compute and cache K/V: one per CLA group."""
        return -(-self.num_layers // self.cla_share)

    @property
    def kv_cache_entry(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """What one KV-owning layer caches per position, as (heads, numbers per head) of its two
        cached tensors: keys and values (GQA), or the latent and the shared RoPE key (MLA)."""
        if self.mla is not None:
            return (1, self.mla.kv_lora_rank), (1, self.mla.qk_rope_head_dim)
        return (self.kv_heads, self.attention_head_dim), (self.kv_heads, self.attention_head_dim)

    @property
    def kv_numbers_per_token(self) -> int:
        """Numbers the KV cache holds per token, over all layers."""
        return self.kv_groups * sum(heads * width for heads, width in self.kv_cache_entry)

    def is_moe_layer(self, index: int) -> bool:
        return (self.moe is not None and (index + 1) % self.moe_every == 0
                and index not in self.dense_layers)

    @property
    def normalises_shared_keys(self) -> bool:
        """With QK-norm after RoPE and CLA, the layers of a group share their keys before the
        norm and each normalises them with its own weights, as Hunyuan-Large does."""
        return self.qk_norm and self.qk_norm_placement == "head_after_rope" and self.cla_share > 1

    def has_k_norm(self, index: int) -> bool:
        return self.qk_norm and (self.owns_kv(index) or self.normalises_shared_keys)

    def owns_kv(self, index: int) -> bool:
        """Whether layer ``index`` computes K/V (the first of its CLA group) or reuses them."""
        return index % self.cla_share == 0

    def dense(self) -> "ModelConfig":
        """The same model with a dense FFN in every layer."""
        return replace(self, moe=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        if isinstance(values.get("moe"), dict):
            values["moe"] = MoEConfig.from_dict(values["moe"])
        if isinstance(values.get("mla"), dict):
            values["mla"] = MLAConfig.from_dict(values["mla"])
        return super().from_dict(values)


EXPERT_LR_RULES = ("sqrt_tokens", "same")
PRECISIONS = ("fp32", "bf16")
# AdamW's implementations in torch: one fused kernel, one multi-tensor pass per operation, or a
# loop over tensors; "auto" takes fused where the device has it, else foreach.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")
# Over what the load-balancing and z-losses are formed (moekit/train/router_loss.py,
# docs/correctness.md): each micro-batch, running global counts, or the whole global batch.
LB_SCOPES = ("micro", "global", "step")


@dataclass(frozen=True)
class DataConfig(_FromDict):
    """Where the text comes from and how it becomes tokens."""

    _kind = "data"

    corpus: tuple[str, ...] = ()  # files or folders of .txt/.md/.jsonl; empty = embedded corpus
    vocab_size: int = 2048  # of the byte-level BPE tokenizer trained on the corpus (257 = bytes)
    val_fraction: float = 0.1  # the last part of every document is held out for validation

    def __post_init__(self):
        _require(isinstance(self.corpus, (tuple, list)) and all(
            isinstance(path, str) and path for path in self.corpus), "corpus", self.corpus,
            "expected a list of file or folder paths")
        object.__setattr__(self, "corpus", tuple(self.corpus))
        _require(isinstance(self.vocab_size, int) and self.vocab_size >= 257, "vocab_size",
                 self.vocab_size, "expected an integer >= 257 (256 bytes + end-of-text)")
        _require(isinstance(self.val_fraction, float) and 0 < self.val_fraction < 0.5,
                 "val_fraction", self.val_fraction, "expected a number in (0, 0.5)")


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """One training run: optimizer, schedule, batch, evaluation and checkpoints."""

    _kind = "train"

    steps: int = 300
    batch_size: int = 16  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per step; batch_size must be a multiple of it
    seq_len: int = 128
    lr: float = 3e-3  # peak learning rate of the non-expert parameters
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    # Where the cosine ends (None: at ``steps``); an extended run keeps its original end
    # (train.optim.extend_schedule).
    schedule_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    # Learning rates of routed experts (Hunyuan-Large): "sqrt_tokens" scales them by
    # sqrt(top_k / num_experts), the square root of the share of tokens each expert sees (Adam's
    # best learning rate grows about with the square root of the batch); "same" = no scaling.
    expert_lr_rule: str = "sqrt_tokens"
    precision: str = "fp32"  # "bf16": autocast (weights and optimizer stay fp32)
    optimizer_impl: str = "auto"  # one of OPTIMIZER_IMPLS; the same update to float rounding
    # "global" by default: with one micro-batch on one process it is "micro", and beyond it
    # balances the global batch, which "Demons in the Detail" (2025) found helps experts
    # specialise, at the cost of one small all-reduce per micro-batch.
    lb_scope: str = "global"
    recompute: bool = False  # activation checkpointing of every layer (Transformer.recompute)
    # torch.use_deterministic_algorithms: bit-identical repeats on a GPU too (a CPU run of
    # moekit repeats bit for bit without it: stable sorts, no order-dependent scatter).
    deterministic: bool = False
    # The long-context stage (Hunyuan-Large: 25%): this share of each step's windows comes
    # from documents at least seq_len + 1 tokens long, the rest from anywhere as before.
    long_fraction: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    # Steps between measurements of expert_similarity (mean pairwise cosine similarity of each
    # MoE layer's expert weights) in metrics.jsonl; 0 = never.
    similarity_every: int = 50
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every",
                     "eval_batches", "checkpoint_every", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        _require(isinstance(self.similarity_every, int) and not isinstance(
            self.similarity_every, bool) and self.similarity_every >= 0, "similarity_every",
            self.similarity_every, "expected an integer >= 0 (0: never)")
        _require(self.batch_size % self.grad_accum == 0, "grad_accum", self.grad_accum,
                 f"must divide batch_size ({self.batch_size})")
        _positive_number("lr", self.lr)
        _require(isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1,
                 "min_lr_ratio", self.min_lr_ratio, "expected a number in [0, 1]")
        _require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
                 self.warmup_steps, "expected an integer >= 0")
        if self.schedule_steps is not None:
            _positive_int("schedule_steps", self.schedule_steps)
        _non_negative("weight_decay", self.weight_decay)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(isinstance(value, float) and 0 <= value < 1, name, value,
                     "expected a number in [0, 1)")
        if self.grad_clip is not None:
            _positive_number("grad_clip", self.grad_clip)
        _require(self.expert_lr_rule in EXPERT_LR_RULES, "expert_lr_rule", self.expert_lr_rule,
                 f"one of {', '.join(EXPERT_LR_RULES)}")
        _require(self.precision in PRECISIONS, "precision", self.precision,
                 f"one of {', '.join(PRECISIONS)}")
        _require(self.optimizer_impl in OPTIMIZER_IMPLS, "optimizer_impl", self.optimizer_impl,
                 f"one of {', '.join(OPTIMIZER_IMPLS)}")
        _require(self.lb_scope in LB_SCOPES, "lb_scope", self.lb_scope,
                 f"one of {', '.join(LB_SCOPES)}")
        _require(isinstance(self.deterministic, bool), "deterministic", self.deterministic,
                 "expected true or false")
        _require(isinstance(self.recompute, bool), "recompute", self.recompute,
                 "expected true or false")
        _require(isinstance(self.long_fraction, (int, float)) and 0 <= self.long_fraction <= 1,
                 "long_fraction", self.long_fraction, "expected a number in [0, 1]")
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed,
                 "expected an integer >= 0")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum



@dataclass(frozen=True)
class ExpertParallelConfig(_FromDict):
    """How the expert-parallel exchange runs: FasterMoE's smart schedule (``overlap``) and
    hot-expert shadowing (``shadow``), whose cost model prices a row's trip and an expert's
    weights with ``link_gbps`` (GB/s between two ranks, 10^9 bytes) and ``expert_gflops`` (the
    expert matmuls' rate on one rank). The defaults are this project's 2-core CPU with gloo
    (docs/parallel.md); a GPU cluster's would be ~50 and ~10^5. Layout only: a checkpoint does
    not depend on it."""

    _kind = "expert-parallel"

    overlap: bool = False
    shadow: bool = False
    link_gbps: float = 1.2
    expert_gflops: float = 60.0

    def __post_init__(self):
        for name in ("overlap", "shadow"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name),
                     "expected true or false")
        _positive_number("link_gbps", self.link_gbps)
        _positive_number("expert_gflops", self.expert_gflops)

def _skywork_moe_146b() -> ModelConfig:
    # Skywork-MoE technical report (arXiv 2406.06563), Table 1: Llama-like, every layer MoE.
    return ModelConfig(vocab_size=65536, hidden_size=4608, num_layers=52, num_heads=36,
                       head_dim=128, ffn_size=12288, max_seq_len=8192, norm_eps=1e-6,
                       moe=MoEConfig(hidden_size=4608, ffn_size=12288, num_experts=16, top_k=2,
                                     logit_norm_scale=1.0, aux_loss="skywork",
                                     adaptive_aux=True, capacity_factor=1.0))


def _hunyuan_large_389b() -> ModelConfig:
    # Hunyuan-Large's released configuration: GQA 80/8 heads of 80, CLA over layer pairs,
    # QK-norm per head after RoPE (its modeling code; each layer of a CLA pair normalises the
    # shared keys with its own weights), 16 routed experts top-1 (gate value not
    # renormalised) + 1 shared expert.
    return ModelConfig(vocab_size=129024, hidden_size=6400, num_layers=64, num_heads=80,
                       num_kv_heads=8, head_dim=80, ffn_size=18304, max_seq_len=262144,
                       rope_base=1e9, norm_eps=1e-5, qk_norm=True,
                       qk_norm_placement="head_after_rope", cla_share=2,
                       moe=MoEConfig(hidden_size=6400, ffn_size=18304, num_experts=16, top_k=1,
                                     router="switch", num_shared_experts=1,
                                     capacity_factor=1.0, overflow="recycle_random"))


def _mixtral_8x7b() -> ModelConfig:
    # Mixtral-8x7B-v0.1's config.json.
    return ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, ffn_size=14336, max_seq_len=32768, rope_base=1e6,
                       norm_eps=1e-5,
                       moe=MoEConfig(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2))


def _fastmoe_transformer_xl() -> ModelConfig:
    # FastMoE's Transformer-XL (enwik8) setting: each FFN 512->2048->512 (ReLU) replaced by 64
    # experts of 512->1024->512, top-2. Relative attention is not modelled: RoPE stands in.
    return ModelConfig(vocab_size=204, hidden_size=512, num_layers=12, num_heads=8,
                       ffn_size=2048, activation="relu", max_seq_len=512,
                       moe=MoEConfig(hidden_size=512, ffn_size=1024, num_experts=64, top_k=2,
                                     activation="relu", normalize_weights=False))


def _deepseek_v3_671b() -> ModelConfig:
    # DeepSeek-V3's config.json (the base model; its multi-token-prediction layer not counted):
    # MLA, 3 dense layers, then 256 routed experts top-8 in 8 groups (4 eligible) + 1 shared,
    # YaRN x40 over an original 4K context.
    return ModelConfig(vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128,
                       ffn_size=18432, max_seq_len=163840, norm_eps=1e-6,
                       rope_scaling={"rope_type": "yarn", "factor": 40.0, "beta_fast": 32,
                                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                     "original_max_position_embeddings": 4096},
                       mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128,
                                     qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536),
                       dense_layers=(0, 1, 2),
                       moe=MoEConfig(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8,
                                     router="sigmoid", aux_loss="none", num_shared_experts=1,
                                     router_options={"n_group": 8, "topk_group": 4,
                                                     "routed_scaling_factor": 2.5}))


def _tiny() -> ModelConfig:
    # Trains on a 2-core CPU in minutes.
    return ModelConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=2, ffn_size=256, max_seq_len=256,
                       moe=MoEConfig(hidden_size=128, ffn_size=128, num_experts=8, top_k=2,
                                     capacity_factor=1.25, adaptive_aux=True))


PRESETS = {
    "tiny": _tiny,
    "skywork-moe-146b": _skywork_moe_146b,
    "hunyuan-large-389b": _hunyuan_large_389b,
    "mixtral-8x7b": _mixtral_8x7b,
    "fastmoe-transformer-xl": _fastmoe_transformer_xl,
    "deepseek-v3-671b": _deepseek_v3_671b,
}


def preset(name: str) -> ModelConfig:
    """The named model preset (a fresh config)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


def read_config_file(path: str | os.PathLike) -> dict:
    """The object in a JSON, TOML or YAML config file (chosen by its suffix)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path!r} is not allowed: expected a .json, .toml, .yaml or "
                         ".yml file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ValueError(f"config file {path!r} cannot be read: {error.strerror}") from None
    try:
        if suffix == ".json":
            values = json.loads(raw)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(raw.decode())
        else:
            import yaml
            values = yaml.safe_load(raw)
    except Exception as error:  # each parser has its own error type; all mean a bad file
        raise ValueError(f"config file {path!r} is not valid {suffix[1:].upper()}: "
                         f"{str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys to values, "
                         f"got {type(values).__name__}")
    return values
