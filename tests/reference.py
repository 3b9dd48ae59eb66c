"""Naive, per-token reference implementations written independently of moekit's vectorised code:
plain Python loops over tokens and routes, plain matmuls per expert."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


def expert_forward(experts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e of a GroupedExperts on one token, from its weights."""
    act = ACT[experts.activation]
    if experts.gated:
        w_ID = experts.gate_up_proj[e]  # [out, in], as nn.Linear: gate rows, then up rows
        gate, up = w_ID[: experts.ffn_size] @ x_D, w_ID[experts.ffn_size:] @ x_D
        h = act(gate) * up
    else:
        h = act(experts.up_proj[e] @ x_D)
    return experts.down_proj[e] @ h


def capacity_keep(expert_ids_TK, keep_TK, capacity: int, num_experts: int,
                  choice_major: bool = False):
    """Walk the routes in token order (or every first choice, then every second, ...: choice
    major); an expert takes a route while it has room."""
    used = [0] * num_experts
    keep = keep_TK.clone()
    num_tokens, top_k = expert_ids_TK.shape
    order = ([(t, k) for k in range(top_k) for t in range(num_tokens)] if choice_major
             else [(t, k) for t in range(num_tokens) for k in range(top_k)])
    for t, k in order:
        if not keep[t, k]:
            continue
        e = int(expert_ids_TK[t, k])
        if used[e] < capacity:
            used[e] += 1
        else:
            keep[t, k] = False
    return keep


def next_best_recycle(expert_ids_TK, keep_TK, overflow_TK, capacity, probs_TE):
    """Round r: each token with a waiting route, in token order, offers its first waiting route
    its r-th best expert outside the token's own top K; taken if that expert has room."""
    num_tokens, top_k = expert_ids_TK.shape
    num_experts = probs_TE.shape[1]
    ids, keep, waiting = expert_ids_TK.clone(), keep_TK.clone(), overflow_TK.clone()
    used = [0] * num_experts
    for t in range(num_tokens):
        for k in range(top_k):
            if keep[t, k]:
                used[int(ids[t, k])] += 1
    probs_TE = probs_TE.detach()
    ranked = []
    for t in range(num_tokens):
        own = set(expert_ids_TK[t].tolist())
        order = sorted(range(num_experts), key=lambda e: (-float(probs_TE[t, e]), e))
        ranked.append([e for e in order if e not in own])
    for r in range(num_experts - top_k):
        for t in range(num_tokens):
            waiting_k = [k for k in range(top_k) if waiting[t, k]]
            if not waiting_k:
                continue
            e = ranked[t][r]
            if used[e] < capacity:
                used[e] += 1
                ids[t, waiting_k[0]] = e
                keep[t, waiting_k[0]] = True
                waiting[t, waiting_k[0]] = False
    return ids, keep


def moe_forward(layer, x_TD, expert_ids_TK, weights_TK, keep_TK=None):
    """Routed output of a layer's GroupedExperts, token by token, route by route."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(expert_ids_TK.shape[1]):
            if keep_TK is None or keep_TK[t, k]:
                e = int(expert_ids_TK[t, k])
                out[t] = out[t] + weights_TK[t, k] * expert_forward(layer.experts, e, x_TD[t])
    return out


def softmax_topk(x_TD, weight_ED, top_k, normalize=True, logit_norm_scale=None):
    """Routing by the textbook formulas, token by token."""
    ids, weights, probs = [], [], []
    for x_D in x_TD:
        z = weight_ED @ x_D
        if logit_norm_scale is not None:
            mean = z.mean()
            std = math.sqrt(float(((z - mean) ** 2).mean()))
            z = logit_norm_scale * (z - mean) / (std + 1e-6)
        p = torch.exp(z - z.max())
        p = p / p.sum()
        chosen = sorted(range(len(p)), key=lambda e: -float(p[e]))[:top_k]
        w = p[chosen]
        if normalize:
            w = w / w.sum()
        ids.append(chosen)
        weights.append(w)
        probs.append(p)
    return torch.tensor(ids), torch.stack(weights), torch.stack(probs)
