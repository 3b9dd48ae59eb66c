#!/usr/bin/env python3
"""The MoE layer's forward and forward+backward time beside its peers, as ratios to the
dense-FLOP floor (one SwiGLU MLP of width top_k * F over the same tokens), all in one run.

    python benchmarks/moe_layer.py                      # E=8 and E=64, fp32, CPU
    python benchmarks/moe_layer.py --shapes all --reps 7
    python benchmarks/moe_layer.py --dtype bf16 --device cuda

Peers are optional columns: Hugging Face transformers' Mixtral block with each experts
implementation (eager, grouped_mm, batched_mm), DeepSpeed-MoE and torchtitan when installed;
each is skipped with a note otherwise. Every layer is checked against HF eager on the same
weights before it is timed. As in training, gradients are set to None before each repetition.
The layers take turns within each repetition and the figures are medians; machines are shared
and noisy, so compare ratios within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer
from moekit.devices import retain_freed_cpu_memory

SHAPES = {  # name: (experts, top_k, ffn)
    "e8": (8, 2, 1024),
    "e64": (64, 2, 1024),
    "e128": (128, 8, 256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseFloor(nn.Module):
    """One SwiGLU MLP with the active FLOPs of top_k experts: the floor the layer is held to."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def hf_block(hidden, ffn, experts, top_k, implementation):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config)


def titan_block(hidden, ffn, experts, top_k, reference):
    """torchtitan's MoE (0.3): softmax router with renormalised top-k, grouped experts that
    multiply in bf16 on CPU whatever the layer's dtype (so it is a peer for bf16 runs)."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (MoE, GroupedExperts, RoutedExperts,
                                              TokenChoiceTopKRouter)
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    block = MoE.Config(
        num_experts=experts, load_balance_coeff=None, shared_experts=None,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=hidden, hidden_dim=ffn, num_experts=experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=experts, top_k=top_k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=experts, gate=Linear.Config(in_features=hidden, out_features=experts),
            top_k=top_k, score_func="softmax", route_norm=True)).build()
    inner = block.routed_experts.inner_experts
    with torch.no_grad():
        block.router.gate.weight.copy_(reference.gate.weight)
        gate_EFD, up_EFD = reference.experts.gate_up_proj.chunk(2, dim=1)
        inner.w1_EFD.copy_(gate_EFD)
        inner.w3_EFD.copy_(up_EFD)
        inner.w2_EDF.copy_(reference.experts.down_proj)
    return block


def deepspeed_block(hidden, ffn, experts, top_k, reference):
    """DeepSpeed-MoE, dropless (it pads every expert to the largest load), in a one-process
    gloo world; its experts are DenseFloor MLPs of width F."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    if not dist.is_initialized():
        store = dist.HashStore()  # a world of one needs no rendezvous
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    block = MoE(hidden, DenseFloor(hidden, ffn), num_experts=experts, ep_size=1, k=top_k,
                drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    block.set_deepspeed_parallelism()
    with torch.no_grad():
        block.deepspeed_moe.gate.wg.weight.copy_(reference.gate.weight)
        for expert, gate_up, down in zip(block.deepspeed_moe.experts.deepspeed_experts,
                                         reference.experts.gate_up_proj,
                                         reference.experts.down_proj):
            expert.w1.weight.copy_(gate_up[:ffn])
            expert.w3.weight.copy_(gate_up[ffn:])
            expert.w2.weight.copy_(down)
    return block


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


def time_once(layer, x):
    """Forward and forward+backward seconds of one repetition."""
    for p in list(layer.parameters()) + [x]:
        p.grad = None
    synchronize = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    synchronize()
    t0 = time.perf_counter()
    out = first_output(layer(x))
    synchronize()
    t1 = time.perf_counter()
    out.float().sum().backward()
    synchronize()
    return t1 - t0, time.perf_counter() - t0


def time_interleaved(layers, x, reps):
    """Median (forward, forward+backward) per layer. The layers take turns within each
    repetition, so that a slow spell of a shared machine hits them all alike."""
    times = {name: [] for name in layers}
    for rep in range(reps + 1):
        for name, layer in layers.items():
            measured = time_once(layer, x)
            if rep:  # the first round is a warm-up
                times[name].append(measured)
    return {name: tuple(statistics.median(column) for column in zip(*runs))
            for name, runs in times.items()}


def build(impl, hidden, ffn, experts, top_k, reference):
    """The layer to time for impl, its weights equal to the HF eager reference's."""
    from moekit.convert.hf import load_hf_moe_block
    if impl == "floor":
        return DenseFloor(hidden, top_k * ffn)
    if impl == "moekit":
        layer = MoELayer(MoEConfig(hidden_size=hidden, ffn_size=ffn, num_experts=experts,
                                   top_k=top_k))
        return load_hf_moe_block(layer, reference)
    if impl.startswith("hf-"):
        block = hf_block(hidden, ffn, experts, top_k, impl[3:])
        block.load_state_dict(reference.state_dict())
        return block
    if impl == "titan":
        return titan_block(hidden, ffn, experts, top_k, reference)
    if impl == "deepspeed":
        return deepspeed_block(hidden, ffn, experts, top_k, reference)
    raise ValueError(f"unknown impl {impl!r}")


def too_big(impl, tokens, hidden, ffn, top_k, dtype):
    """HF batched_mm gathers a weight copy per route: skip it where that cannot fit."""
    if impl != "hf-batched_mm":
        return None
    need = tokens * top_k * 3 * hidden * ffn * torch.finfo(dtype).bits // 8
    return f"needs ~{need / 2**30:.0f} GiB for its per-route weight copies" if need > 8 * 2**30 else None


def run_shape(name, args, dtype, device):
    experts, top_k, ffn = SHAPES[name]
    torch.manual_seed(0)
    reference = hf_block(args.hidden, ffn, experts, top_k, "eager")
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.02)  # HF experts start as torch.empty: garbage would skew timings
    reference = reference.to(device)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    # Every layer is checked in fp32 (bf16 rounding would flip near-tied routes between
    # implementations whose gates compute in different precisions), then cast for timing.
    check_x = x.detach()[:, :256].float()
    with torch.no_grad():
        expected = first_output(reference(check_x))
    layers, notes = {}, []
    for impl in args.impls.split(","):
        reason = too_big(impl, args.tokens, args.hidden, ffn, top_k, dtype)
        if impl == "titan" and dtype != torch.bfloat16:
            reason = "it multiplies its experts in bf16 on CPU: compare it with --dtype bf16"
        if reason:
            notes.append(f"{impl}: skipped, {reason}")
            continue
        try:
            layer = build(impl, args.hidden, ffn, experts, top_k, reference).to(device)
        except ImportError as error:
            notes.append(f"{impl}: skipped, {error}")
            continue
        if impl != "floor":
            with torch.no_grad():
                got = first_output(layer(check_x)).float()
            error = float((got - expected).abs().max() / expected.abs().max())
            tolerance = 2e-2 if impl == "titan" else 1e-4  # titan: bf16 expert matmuls
            if error > tolerance:
                raise SystemExit(f"{impl} disagrees with HF eager: max rel err {error:.1e}")
        layer = layer.to(dtype)
        layers[impl] = layer
    rows = time_interleaved(layers, x, args.reps)
    floor = rows.get("floor")
    print(f"\nE={experts} k={top_k} H={args.hidden} F={ffn} T={args.tokens} {args.dtype} "
          f"{device} torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"{'impl':16s} {'fwd (ratio)':>12s} {'fwd+bwd (ratio)':>16s}   median s fwd / fwd+bwd")
    for impl, (fwd, both) in rows.items():
        ratio = (f"{fwd / floor[0]:12.2f} {both / floor[1]:16.2f}" if floor else f"{'-':>12s} {'-':>16s}")
        print(f"{impl:16s} {ratio}   {fwd:.3f} / {both:.3f}")
    for note in notes:
        print("  " + note)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="e8,e64",
                        help=f"comma-separated from {', '.join(SHAPES)}, or 'all'")
    parser.add_argument("--impls", default="floor,moekit,hf-eager,hf-grouped_mm,hf-batched_mm,"
                        "deepspeed,titan", help="comma-separated; peers that are not installed "
                        "are skipped with a note")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's allocator settings (by default every layer in the run "
                        "reuses freed memory: moekit.devices.retain_freed_cpu_memory)")
    args = parser.parse_args()
    if not args.malloc_defaults:
        retain_freed_cpu_memory()
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {', '.join(SHAPES)} or all")
    for name in shapes:
        run_shape(name, args, DTYPES[args.dtype], torch.device(args.device))


def peer_layer(hidden, ffn, experts, top_k):
    """Factory for ../shared/tools/peer_layers.py: --moekit benchmarks.moe_layer:peer_layer."""
    return MoELayer(MoEConfig(hidden_size=hidden, ffn_size=ffn, num_experts=experts, top_k=top_k))


if __name__ == "__main__":
    main()
