"""A decoder-only MoE Transformer, readable top to bottom.

RMSNorm, RoPE (configurable base and scaling, over the whole head or its first ``rotary_dim``
numbers), grouped-query attention (GQA), cross-layer attention (CLA: the first layer of every
``cla_share`` adjacent layers computes K/V, the others reuse them, and the KV cache holds one
entry per group), optional QK-norm (per head before or after RoPE, or over the whole q/k
projection) and QKV bias, or multi-head latent attention (MLA, DeepSeek), and an MoE
feed-forward block (routed + shared experts) in every ``moe_every``-th layer not in
``dense_layers``, a dense SwiGLU MLP elsewhere.
Weight names follow Hugging Face's Llama/Mixtral family where they can.

Shapes: B batch, S new positions, P positions in the cache (past + new), H query heads,
G key/value heads, Dh head dim, D model dim, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moekit.config import ModelConfig
from moekit.model.rope import apply_rope, latent_softmax_scale, rope_cos_sin
from moekit.moe import MLP, GroupedExperts, MoELayer, MoEStats
from moekit.moe.row_products import Linear, linear


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Preallocated keys and values, one pair per CLA group: [B, G, max_len, Dh] each, plus which
    cached positions are real tokens (left padding is not). With multi-head latent attention
    the pair is the latent [B, 1, max_len, kv_lora_rank] and the shared RoPE key [B, 1,
    max_len, qk_rope_head_dim] (``ModelConfig.kv_cache_entry``)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device=None, dtype=torch.float32):
        (key_heads, key_width), (value_heads, value_width) = config.kv_cache_entry
        self.keys = [torch.zeros(batch_size, key_heads, max_len, key_width, device=device,
                                 dtype=dtype) for _ in range(config.kv_groups)]
        self.values = [torch.zeros(batch_size, value_heads, max_len, value_width, device=device,
                                   dtype=dtype) for _ in range(config.kv_groups)]
        self.valid_BP = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def bytes_per_token(config: ModelConfig, itemsize: int) -> int:
        """What one position caches in every CLA group, ``itemsize`` bytes per number."""
        return config.kv_numbers_per_token * itemsize

    @staticmethod
    def bytes_needed(config: ModelConfig, batch_size: int, max_len: int,
                     dtype: torch.dtype = torch.float32) -> int:
        """What ``KVCache(config, batch_size, max_len, dtype=dtype).nbytes`` will be."""
        return batch_size * max_len * KVCache.bytes_per_token(config, dtype.itemsize)

    def check_room(self, seq: int) -> None:
        if self.length + seq > self.max_len:
            raise ValueError(f"sequence of {self.length + seq} positions is longer than the "
                             f"cache ({self.max_len})")

    def positions_and_mask(self, mask_BS, batch: int, seq: int, device, window=None):
        """Positions of the new tokens and the attention mask (see ``positions_and_mask``)."""
        past = self.length
        self.valid_BP[:, past:past + seq] = True if mask_BS is None else mask_BS
        return positions_and_mask(mask_BS, self.valid_BP[:, :past + seq], past, batch, seq,
                                  device, window)

    def store(self, group: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
        """Write the new positions of one group; return its keys and values so far."""
        end = self.length + k_BGSD.shape[2]
        self.keys[group][:, :, self.length:end] = k_BGSD
        self.values[group][:, :, self.length:end] = v_BGSD
        return self.keys[group][:, :, :end], self.values[group][:, :, :end]

    def advance(self, seq: int) -> None:
        self.length += seq


def scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x times factor. Only Granite's multipliers differ from 1.0, and an elementwise product
    by 1.0 still costs a pass over the tensor and its gradient, so it is skipped (same bits)."""
    return x if factor == 1.0 else x * factor


def positions_and_mask(mask_BS, valid_BP, past: int, batch: int, seq: int, device,
                       window: int | None = None):
    """Positions of ``seq`` new tokens after ``past`` cached ones, and the attention mask
    [B, 1, S, P] (None when plain causal attention is right). ``valid_BP`` marks the real
    tokens among all P = past + seq positions (None without a cache: ``mask_BS`` then).
    With a sliding ``window``, a query sees the ``window`` last positions up to its own, as
    transformers counts them (by index, which left padding does not change between real
    tokens)."""
    unpadded = mask_BS is None and (valid_BP is None or valid_BP[:, :past].all())
    if unpadded and (window is None or past + seq <= window):
        positions_BS = torch.arange(past, past + seq, device=device).expand(batch, seq)
        if past == 0 or seq == 1:
            return positions_BS, None  # causal (or a single query seeing everything)
    if valid_BP is None:
        valid_BP = (torch.ones(batch, seq, dtype=torch.bool, device=device) if mask_BS is None
                    else mask_BS)
    positions_BS = (valid_BP.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    query_SP = torch.arange(past, past + seq, device=device)[:, None]
    key_SP = torch.arange(past + seq, device=device)[None, :]
    allowed_SP = key_SP <= query_SP
    if window is not None:
        allowed_SP = allowed_SP & (key_SP > query_SP - window)
    allowed_BSP = allowed_SP & valid_BP[:, None, :]
    allowed_BSP |= key_SP == query_SP  # a padded query attends to itself: no empty rows
    return positions_BS, allowed_BSP[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        d, h, g, dh = (config.hidden_size, config.num_heads, config.kv_heads,
                       config.attention_head_dim)
        self.num_heads, self.kv_heads, self.head_dim = h, g, dh
        self.q_proj = Linear(d, h * dh, bias=config.qkv_bias)
        self.o_proj = Linear(h * dh, d, bias=config.attention_out_bias)
        self.owns_kv = owns_kv = config.owns_kv(index)
        self.score_scale = config.attention_multiplier  # None: sdpa's 1/sqrt(Dh)
        self.dropout = config.attention_dropout
        if owns_kv:
            self.k_proj = Linear(d, g * dh, bias=config.qkv_bias)
            self.v_proj = Linear(d, g * dh, bias=config.qkv_bias)
        self.qk_norm_placement = config.qk_norm_placement
        over_projection = config.qk_norm_placement == "projection"
        self.q_norm = (RMSNorm(h * dh if over_projection else dh, config.norm_eps)
                       if config.qk_norm else None)
        self.k_norm = (RMSNorm(g * dh if over_projection else dh, config.norm_eps)
                       if config.has_k_norm(index) else None)
        self.normalises_shared_keys = config.normalises_shared_keys

    def _heads(self, x_BSX: torch.Tensor, heads: int) -> torch.Tensor:
        batch, seq, _ = x_BSX.shape
        return x_BSX.view(batch, seq, heads, self.head_dim).transpose(1, 2)

    def _rotated_heads(self, projection, norm, x_BSD, heads: int, rope) -> torch.Tensor:
        """Queries or keys [B, heads, S, Dh]: projected, split into heads and rotated, with
        QK-norm (``norm``, None when off) where the config places it."""
        placement = self.qk_norm_placement if norm is not None else None
        y = projection(x_BSD)
        if placement == "projection":
            y = norm(y)
        y_BHSD = self._heads(y, heads)
        if placement == "head":
            y_BHSD = norm(y_BHSD)
        y_BHSD = apply_rope(y_BHSD, *rope)
        return norm(y_BHSD) if placement == "head_after_rope" else y_BHSD

    def forward(self, x_BSD, rope, attn_mask, shared_kv=None, cache=None, group=0):
        """Returns the attention output and the (keys, values) this layer attended to, which
        the next layers of its CLA group reuse."""
        q_BHSD = self._rotated_heads(self.q_proj, self.q_norm, x_BSD, self.num_heads, rope)
        if self.owns_kv:
            k_BGSD = self._rotated_heads(
                self.k_proj, None if self.normalises_shared_keys else self.k_norm, x_BSD,
                self.kv_heads, rope)
            v_BGSD = self._heads(self.v_proj(x_BSD), self.kv_heads)
            if cache is not None:
                k_BGSD, v_BGSD = cache.store(group, k_BGSD, v_BGSD)
            shared_kv = (k_BGSD, v_BGSD)
        k_BGPD, v_BGPD = shared_kv
        if self.normalises_shared_keys:
            k_BGPD = self.k_norm(k_BGPD)
        out_BHSD = F.scaled_dot_product_attention(
            q_BHSD, k_BGPD, v_BGPD, attn_mask=attn_mask,
            is_causal=attn_mask is None and q_BHSD.shape[2] > 1, scale=self.score_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.num_heads)
        batch, _, seq, _ = out_BHSD.shape
        return self.o_proj(out_BHSD.transpose(1, 2).reshape(batch, seq, -1)), shared_kv


# DeepSeek's code norms both latents with its RMSNorm's default eps, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3; ``ModelConfig.mla``), with transformers'
    weight names. Shapes as above, plus L the KV latent (kv_lora_rank); N, R and V the
    position-free, rotated and value numbers of a head; X a concatenation of two of these.

    The cache holds the latent and the shared RoPE key (one "head" each). Without past
    positions (training, a first prefill) the latent is expanded into each head's keys and
    values; with them (decoding) the expansion is absorbed into the queries and the output
    instead (DeepSeek-V2, section 2.1.2): q_nope . (W_uk c) = (W_uk^T q_nope) . c, so attention
    runs over the latent itself and the P cached positions are never expanded."""

    absorb = True  # False only to measure what absorbing saves (benchmarks/mla_decode.py)

    def __init__(self, config: ModelConfig):
        super().__init__()
        mla, d, h = config.mla, config.hidden_size, config.num_heads
        self.num_heads, self.rank = h, mla.kv_lora_rank
        self.nope_dim, self.rope_dim, self.value_dim = (mla.qk_nope_head_dim,
                                                        mla.qk_rope_head_dim, mla.v_head_dim)
        self.query_rank = mla.q_lora_rank
        if mla.q_lora_rank is None:
            self.q_proj = Linear(d, h * mla.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, mla.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, h * mla.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.rank, h * (self.nope_dim + self.value_dim), bias=False)
        self.o_proj = Linear(h * self.value_dim, d, bias=False)
        self.score_scale = (config.attention_multiplier
                            or latent_softmax_scale(mla.qk_head_dim, config.rope_scaling))
        self.dropout = config.attention_dropout

    def _queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q = (self.q_proj(x_BSD) if self.query_rank is None
             else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD))))
        batch, seq, _ = x_BSD.shape
        return q.view(batch, seq, self.num_heads, -1).transpose(1, 2)

    def _attend(self, q, k, v, attn_mask):
        # Values padded with zeros to the queries' width: sdpa's fused kernels need it, and
        # without them it falls back to the math path, which keeps every head's S x S
        # probabilities for the backward.
        width = v.shape[-1]
        out = F.scaled_dot_product_attention(
            q, k, F.pad(v, (0, q.shape[-1] - width)), attn_mask=attn_mask,
            is_causal=attn_mask is None and q.shape[2] > 1, scale=self.score_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1])
        return out[..., :width]

    def forward(self, x_BSD, rope, attn_mask, shared_kv=None, cache=None, group=0):
        batch, seq, _ = x_BSD.shape
        q_nope_BHSN, q_rope_BHSR = self._queries(x_BSD).split([self.nope_dim, self.rope_dim], -1)
        q_rope_BHSR = apply_rope(q_rope_BHSR, *rope)
        latent_BSL, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.rank, self.rope_dim],
                                                                      -1)
        latent_B1SL = self.kv_a_layernorm(latent_BSL)[:, None]
        k_rope_B1SR = apply_rope(k_rope_BSR[:, None], *rope)
        latent_B1PL, k_rope_B1PR = ((latent_B1SL, k_rope_B1SR) if cache is None
                                    else cache.store(group, latent_B1SL, k_rope_B1SR))
        positions = latent_B1PL.shape[2]
        # A quantized kv_b_proj multiplies through its own kernels: expanded, never absorbed.
        if self.absorb and positions > seq and type(self.kv_b_proj) is Linear:
            w_up_HXL = self.kv_b_proj.weight.view(self.num_heads, -1, self.rank)
            w_key_HNL, w_value_HVL = w_up_HXL.split([self.nope_dim, self.value_dim], 1)
            q_BHSX = torch.cat([q_nope_BHSN @ w_key_HNL, q_rope_BHSR], -1)
            k_B1PX = torch.cat([latent_B1PL, k_rope_B1PR], -1)
            out_BHSL = self._attend(q_BHSX, k_B1PX, latent_B1PL, attn_mask)
            out_BHSV = out_BHSL @ w_value_HVL.transpose(1, 2)
        else:
            kv_BPHX = self.kv_b_proj(latent_B1PL[:, 0]).view(batch, positions, self.num_heads, -1)
            k_nope_BHPN, v_BHPV = kv_BPHX.transpose(1, 2).split([self.nope_dim, self.value_dim],
                                                                -1)
            k_BHPX = torch.cat([k_nope_BHPN, k_rope_B1PR.expand(-1, self.num_heads, -1, -1)], -1)
            out_BHSV = self._attend(torch.cat([q_nope_BHSN, q_rope_BHSR], -1), k_BHPX, v_BHPV,
                                    attn_mask)
        return self.o_proj(out_BHSV.transpose(1, 2).reshape(batch, seq, -1)), None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = (LatentAttention(config) if config.mla is not None
                     else Attention(config, index))
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.residual_multiplier = config.residual_multiplier
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.ffn = (MoELayer(config.moe, layer_index=index) if config.is_moe_layer(index)
                    else MLP(config.hidden_size, config.ffn_size, config.activation))

    def forward(self, x_BSD, rope, attn_mask, token_mask_BS, shared_kv, cache, group):
        x_BSD, shared_kv = self.attend(x_BSD, rope, attn_mask, shared_kv, cache, group)
        x_BSD, stats = self.feed_forward(x_BSD, token_mask_BS)
        return x_BSD, shared_kv, stats

    # The block's two halves, which a mixed serving forward (``Transformer.run_parts``) runs
    # apart: attention once per part of the batch, the feed-forward once over all its tokens.

    def attend(self, x_BSD, rope, attn_mask, shared_kv, cache, group):
        """The attention half with its residual; returns the (keys, values) attended to."""
        attn_out, shared_kv = self.attn(self.attn_norm(x_BSD), rope, attn_mask, shared_kv,
                                        cache, group)
        return x_BSD + scaled(self.hidden_dropout(attn_out), self.residual_multiplier), shared_kv

    def feed_forward(self, x_BSD, token_mask_BS):
        """The feed-forward half with its residual; the MoE layer's statistics (None for a
        dense MLP)."""
        stats = None
        if isinstance(self.ffn, MoELayer):
            ffn_out, stats = self.ffn(self.ffn_norm(x_BSD), token_mask_BS)
        else:
            ffn_out = self.ffn(self.ffn_norm(x_BSD))
        return x_BSD + scaled(self.hidden_dropout(ffn_out), self.residual_multiplier), stats


INIT_STD = 0.02  # of every matrix that Transformer.reset_parameters draws


def _part_builders(config: ModelConfig) -> list[tuple[str, Callable[[], nn.Module]]]:
    """The model's top-level parts by name, in the order ``Transformer`` builds them."""
    parts = [("embed_tokens", lambda: nn.Embedding(config.vocab_size, config.hidden_size))]
    parts += [(f"layers.{i}", lambda i=i: Block(config, i)) for i in range(config.num_layers)]
    parts.append(("norm", lambda: RMSNorm(config.hidden_size, config.norm_eps)))
    if not config.tie_embeddings:
        parts.append(("lm_head", lambda: Linear(config.hidden_size, config.vocab_size,
                                                    bias=False)))
    return parts


def _redraws(module: nn.Module) -> bool:
    """Whether ``Transformer.reset_parameters`` draws ``module``'s own parameters again."""
    return isinstance(module, (nn.Linear, nn.Embedding, GroupedExperts))


@torch.no_grad()
def _redraw(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, GroupedExperts):
        module.reset_parameters(std)


def init_in_parts(config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``Transformer(config)`` built from the current random state, by name,
    one top-level part (the embedding, a block, ...) whole at a time, each dropped before the
    next is drawn: what a rank of a sharded run reads its parts from, so that it holds the
    one-process model's values without ever holding that model. The CPU generator (mt19937)
    cannot skip ahead, so every number the constructor draws is drawn again, in its order:
    first each part as constructed (every parameter and buffer), then each part's
    ``reset_parameters`` draws (its matrices again: a name comes twice, the later value is
    the model's)."""
    builders = _part_builders(config)
    for prefix, build in builders:
        part = build()
        yield from ((f"{prefix}.{name}", tensor) for name, tensor in
                    [*part.named_parameters(), *part.named_buffers()])
    for prefix, build in builders:
        with torch.device("meta"):  # built without a draw: only the redraws count
            part = build()
        part.to_empty(device="cpu")
        for path, module in part.named_modules():
            if _redraws(module):
                _redraw(module, INIT_STD)
                yield from ((".".join(filter(None, (prefix, path, name))), tensor)
                            for name, tensor in module.named_parameters(recurse=False))


class LayerStack(nn.ModuleDict):
    """The model's blocks by their number, ``layers.N`` in every weight name. A pipeline stage
    keeps some of them (``keep``) without renumbering the others, as a ``ModuleList`` would, so
    a stage's weights have the names the whole model's have. Indexed and iterated like a list,
    in layer order."""

    def __init__(self, blocks):
        super().__init__({str(index): block for index, block in enumerate(blocks)})

    def __getitem__(self, index):
        return super().__getitem__(str(index))

    def __iter__(self):
        return iter(self.values())

    def numbered(self):
        """(layer number, block) in order."""
        return ((int(name), block) for name, block in self.items())

    def keep(self, numbers) -> None:
        """Drop every block whose number is not in ``numbers``."""
        for name in [name for name in self.keys() if int(name) not in set(numbers)]:
            del self[name]


def _document_positions_and_mask(document_ids_BS: torch.Tensor, mask_BS: torch.Tensor | None,
                                 window: int | None):
    """Positions restarting at each packed document (counting its real tokens), and the
    attention mask: causal within a document (and the sliding ``window``), never across one,
    never onto padding."""
    seq = document_ids_BS.shape[1]
    causal_SS = torch.ones(seq, seq, dtype=torch.bool, device=document_ids_BS.device).tril(
        ).triu(diagonal=1 - (window or seq))
    same_BSS = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
    allowed_BSS = same_BSS & causal_SS
    if mask_BS is not None:
        allowed_BSS &= mask_BS[:, None, :]
    positions_BS = (allowed_BSS.sum(-1) - 1).clamp(min=0)
    allowed_BSS |= torch.eye(seq, dtype=torch.bool, device=document_ids_BS.device)  # no empty row
    return positions_BS, allowed_BSS[:, None]


@dataclass
class TransformerOutput:
    logits: torch.Tensor  # [B, S, V]
    router_loss: torch.Tensor  # sum over MoE layers of their weighted router losses
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in order


class Transformer(nn.Module):
    """``forward(input_ids, mask=None, cache=None, last_only=False, document_ids=None,
    logits_mask=None) -> TransformerOutput``.

    mask [B, S] bool marks real tokens (False = padding, e.g. the left padding of batched
    prompts): padding is not attended to, not routed and not counted. With a ``KVCache`` the
    new positions are appended to it; positions count real tokens only. Any cache with the
    same four methods (``check_room``, ``positions_and_mask``, ``store``, ``advance``) works,
    such as ``moekit.model.paged.PagedBatch``, whose rows each sit at their own position.
    ``document_ids`` [B, S] (integers; without a cache) packs several documents into a row: a
    token attends only to the earlier tokens of its own document, and positions restart at
    each document, so that every document computes as it would alone.

    ``recompute``: when gradients are recorded, each layer keeps only its input and computes
    its activations again in the backward (activation checkpointing), trading about one more
    forward for the activations' memory. The recomputed forward routes exactly as the first:
    the random state is restored for it and no layer changes state in a forward.
    """

    recompute = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        parts = dict(_part_builders(config))  # built in this order: init_in_parts replays it
        self.embed_tokens = parts["embed_tokens"]()
        self.layers = LayerStack(parts[f"layers.{i}"]() for i in range(config.num_layers))
        self.norm = parts["norm"]()
        self.lm_head = parts["lm_head"]() if "lm_head" in parts else None
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD) -> None:
        for module in self.modules():
            _redraw(module, std)

    def _check(self, input_ids, mask, cache, document_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long,
                                                                             torch.int):
            raise ValueError("input_ids must be an integer tensor of shape [batch, seq]")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, seq]")
        if cache is not None:
            cache.check_room(input_ids.shape[1])
        elif input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} positions is longer than the "
                             f"model context ({self.config.max_seq_len})")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != input_ids.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(input_ids.shape)}")
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids is for training and scoring: not with a cache")
            if document_ids.shape != input_ids.shape or document_ids.is_floating_point():
                raise ValueError("document_ids must be an integer tensor of shape "
                                 f"{tuple(input_ids.shape)}")

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                document_ids: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None) -> TransformerOutput:
        """``last_only``: logits of the last position only (all generation needs of a
        prompt; the output projection of the others would be wasted). ``logits_mask`` [B, S]
        bool: logits only where it is True, as [N, V] in row order (a loss needs none of the
        others: in supervised fine-tuning most positions are a prompt's or padding, and the
        head with its softmax is the largest product of a small model's step)."""
        self._check(input_ids, mask, cache, document_ids)
        if logits_mask is not None and (logits_mask.dtype != torch.bool
                                        or logits_mask.shape != input_ids.shape or last_only):
            raise ValueError(f"logits_mask must be a bool tensor of shape "
                             f"{tuple(input_ids.shape)}, and not with last_only")
        x_BSD = self.embed(input_ids)
        x_BSD, all_stats = self.run_layers(x_BSD, mask, cache, document_ids)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        router_loss = x_BSD.new_zeros((), dtype=torch.float32)
        for stats in all_stats:
            router_loss = router_loss + stats.router_loss
        if last_only:
            x_BSD = x_BSD[:, -1:]
        logits = self.head(x_BSD if logits_mask is None else x_BSD[logits_mask])
        return TransformerOutput(logits=logits, router_loss=router_loss, moe_stats=all_stats)

    # The three parts of ``forward``, which a pipeline stage runs as far as it holds them.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return scaled(self.embed_tokens(input_ids), self.config.embedding_multiplier)

    def run_layers(self, x_BSD: torch.Tensor, mask: torch.Tensor | None = None,
                   cache=None, document_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, list[MoEStats]]:
        """The blocks this model holds, in order, on hidden states ``x_BSD``; with the MoE
        layers' statistics. Positions and the attention mask follow from ``mask`` (and the
        cache, or the packed ``document_ids``) alone, so that every stage of a pipeline derives
        the same ones."""
        rope, masks = self._attention_inputs(x_BSD, mask, cache, document_ids)
        all_stats, shared_kv = [], None
        for index, layer in self.layers.numbered():
            group = index // self.config.cla_share
            inputs = (x_BSD, rope, self._layer_mask(index, masks), mask, shared_kv, cache, group)
            if self.recompute and torch.is_grad_enabled():
                x_BSD, shared_kv, stats = checkpoint(layer, *inputs, use_reentrant=False)
            else:
                x_BSD, shared_kv, stats = layer(*inputs)
            if stats is not None:
                all_stats.append(stats)
        return x_BSD, all_stats

    def run_parts(self, parts: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
        """Several batches (``parts``: token ids [B, S] with the cache of their rows, such as
        a ``PagedBatch``) through every block in one forward: per layer, the attention half
        runs once per part (over its own cache, positions and mask), then the feed-forward
        half once over the tokens of all parts together, so that its weights (the routed
        experts above all) are read once for all of them. How a server folds new prompts
        into a decoding step (``moekit/serve/scheduler.py``): the decoding rows as one
        [B, 1] part, each prompt chunk as a part of its own. Returns each part's last hidden
        states [B, S, D]; every cache is advanced."""
        for ids_BS, cache in parts:
            self._check(ids_BS, None, cache, None)
        xs_BSD = [self.embed(ids_BS) for ids_BS, _ in parts]
        inputs = [self._attention_inputs(x_BSD, None, cache, None)
                  for x_BSD, (_, cache) in zip(xs_BSD, parts)]
        tokens = [ids_BS.numel() for ids_BS, _ in parts]
        shared_kvs = [None] * len(parts)
        for index, layer in self.layers.numbered():
            group = index // self.config.cla_share
            for part, ((_, cache), (rope, masks)) in enumerate(zip(parts, inputs)):
                xs_BSD[part], shared_kvs[part] = layer.attend(
                    xs_BSD[part], rope, self._layer_mask(index, masks), shared_kvs[part],
                    cache, group)
            x_1TD, _ = layer.feed_forward(torch.cat([x.flatten(0, 1) for x in xs_BSD])[None],
                                          None)
            xs_BSD = [x_TD.view_as(x) for x_TD, x in zip(x_1TD[0].split(tokens), xs_BSD)]
        for ids_BS, cache in parts:
            cache.advance(ids_BS.shape[1])
        return xs_BSD

    def _attention_inputs(self, x_BSD, mask, cache, document_ids):
        """RoPE's cos and sin at the new positions, and the attention masks every layer picks
        from (``_layer_mask``)."""
        window = self.config.sliding_window
        positions_BS, window_mask = self._positions_and_mask(x_BSD, mask, cache, document_ids,
                                                             window)
        full_mask = window_mask
        if window is not None and self.config.full_attention_layers:
            _, full_mask = self._positions_and_mask(x_BSD, mask, cache, document_ids, None)
        rope = rope_cos_sin(positions_BS, self.config.rope_dim, self.config.rope_base,
                            x_BSD.dtype, self.config.rope_scaling)
        return rope, (window_mask, full_mask)

    def _layer_mask(self, index: int, masks):
        window_mask, full_mask = masks
        return window_mask if self.config.uses_window(index) else full_mask

    @staticmethod
    def _positions_and_mask(x_BSD, mask, cache, document_ids, window):
        batch, seq, _ = x_BSD.shape
        if document_ids is not None:
            return _document_positions_and_mask(document_ids, mask, window)
        if cache is None:
            return positions_and_mask(mask, None, 0, batch, seq, x_BSD.device, window)
        return cache.positions_and_mask(mask, batch, seq, x_BSD.device, window)

    def head(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of the last hidden states."""
        x_BSD = self.norm(x_BSD)
        logits = (linear(x_BSD, self.embed_tokens.weight) if self.lm_head is None
                  else self.lm_head(x_BSD))
        scaling = self.config.logits_scaling  # a division, as Granite's own code does
        return logits if scaling == 1.0 else logits / scaling

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.norm.weight  # of the model's type even when the embeddings are quantized
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len,
                       device=weight.device, dtype=weight.dtype)
