"""Memory for inference: do the weights fit, and how much KV cache is left?

Weights in the chosen format (bf16 2 bytes, fp8 and int8 1 byte per number) for every matrix,
embeddings and experts included; norm weights (vectors, a negligible share) stay bf16. The
quantization scales (one per output channel) are left out: under 0.1% of the weights for
matrices of a thousand or more columns. Weights and KV cache are split evenly over the devices
(tensor and expert parallel); what remains after the weights is free for the KV cache, counted
in tokens of cache at the KV-cache format.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.plan.kv_cache import kv_cache_bytes_per_token
from moekit.plan.params import count_parameters, layer_parameters
from moekit.plan.units import GIB, dtype_bytes, require_positive

INFERENCE_DTYPES = ("bf16", "fp8", "int8")


@dataclass(frozen=True)
class InferenceMemory:
    dtype: str
    devices: int
    device_memory_bytes: float
    weight_bytes: int  # all devices together
    kv_dtype: str
    kv_bytes_per_token: int

    @property
    def weight_bytes_per_device(self) -> float:
        return self.weight_bytes / self.devices

    @property
    def fits(self) -> bool:
        return self.weight_bytes_per_device <= self.device_memory_bytes

    @property
    def free_bytes_per_device(self) -> float:
        """Left for the KV cache (and the runtime) on each device; negative when it does not
        fit."""
        return self.device_memory_bytes - self.weight_bytes_per_device

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens of KV cache (over all sequences of a batch) that the free memory holds."""
        return max(0, int(self.free_bytes_per_device * self.devices // self.kv_bytes_per_token))

    def to_dict(self) -> dict:
        return {**self.__dict__, "weight_bytes_per_device": self.weight_bytes_per_device,
                "fits": self.fits, "free_bytes_per_device": self.free_bytes_per_device,
                "kv_cache_tokens": self.kv_cache_tokens}


def inference_weight_bytes(config: ModelConfig, dtype: str) -> int:
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"inference dtype {dtype!r} is not allowed: one of "
                         f"{', '.join(INFERENCE_DTYPES)}")
    params = count_parameters(config)
    norms = params.component("norms").total
    return (params.total - norms) * dtype_bytes(dtype) + norms * dtype_bytes("bf16")


def inference_memory(config: ModelConfig, dtype: str, devices: int, device_memory_gib: float,
                     kv_dtype: str = "bf16") -> InferenceMemory:
    require_positive("devices", devices, integer=True)
    require_positive("device_memory_gib", device_memory_gib)
    return InferenceMemory(dtype, devices, device_memory_gib * GIB,
                           inference_weight_bytes(config, dtype), kv_dtype,
                           kv_cache_bytes_per_token(config, kv_dtype))


@dataclass(frozen=True)
class OffloadPlan:
    """One device serving with its routed experts offloaded (``--expert-memory``): the
    resident part (everything but the routed experts) stays in memory, a cache of
    ``cache_bytes`` holds whole experts, and each route to an expert that is not cached moves
    that expert (``expert_bytes``) from host memory or disk. ``hit_rate``: the share of routes
    the cache serves; by default its estimate under uniform routing (cached / all experts:
    every policy's hit rate when each route picks an expert uniformly and independently)."""
    dtype: str
    device_memory_bytes: float | None
    weight_bytes: int
    resident_bytes: int
    expert_bytes: int  # one routed expert of one layer
    experts: int  # routed experts of all MoE layers
    routes_per_token: int  # top_k x MoE layers
    cache_bytes: float
    given_hit_rate: float | None

    @property
    def fits_resident(self) -> bool | None:
        if self.device_memory_bytes is None:
            return None
        return self.weight_bytes <= self.device_memory_bytes

    @property
    def cached_experts(self) -> int:
        return max(0, min(int(self.cache_bytes // self.expert_bytes), self.experts))

    @property
    def fits_offloaded(self) -> bool:
        """The resident part and at least one cached expert fit the device."""
        used = self.resident_bytes + self.cached_experts * self.expert_bytes
        return self.cached_experts >= 1 and (self.device_memory_bytes is None
                                             or used <= self.device_memory_bytes)

    @property
    def uniform_hit_rate(self) -> float:
        return self.cached_experts / self.experts

    @property
    def hit_rate(self) -> float:
        return self.uniform_hit_rate if self.given_hit_rate is None else self.given_hit_rate

    @property
    def bytes_per_token(self) -> float:
        """Expert bytes moved per decoded token (batch 1): each of its routes misses with
        probability 1 - hit_rate and then moves one expert."""
        return (1 - self.hit_rate) * self.routes_per_token * self.expert_bytes

    def to_dict(self) -> dict:
        return {**self.__dict__, **{name: getattr(self, name) for name in (
            "fits_resident", "cached_experts", "fits_offloaded", "uniform_hit_rate",
            "hit_rate", "bytes_per_token")}}


def offload_plan(config: ModelConfig, dtype: str, device_memory_gib: float | None = None,
                 expert_memory_bytes: int | None = None,
                 hit_rate: float | None = None) -> OffloadPlan:
    """Whether ``config`` fits one device resident, and what serving it with offloaded
    experts caches and moves. The cache is ``expert_memory_bytes`` when given, else what the
    device leaves once the resident part is in (one of the two is needed)."""
    if config.moe is None:
        raise ValueError("offloading plans the routed experts of an MoE model; this one is dense")
    if device_memory_gib is None and expert_memory_bytes is None:
        raise ValueError("offloading needs the device's memory (--device or "
                         "--device-memory-gib) or the cache's size (--expert-memory)")
    if device_memory_gib is not None:
        require_positive("device_memory_gib", device_memory_gib)
    if expert_memory_bytes is not None:
        require_positive("expert_memory_bytes", expert_memory_bytes, integer=True)
    if hit_rate is not None and not 0 <= hit_rate <= 1:
        raise ValueError(f"hit rate {hit_rate} is not allowed: expected a share from 0 to 1")
    weight_bytes = inference_weight_bytes(config, dtype)
    moe_layers = sum(layer_parameters(config, index).routed_experts > 0
                     for index in range(config.num_layers))
    routed_bytes = count_parameters(config).component("routed_experts").total \
        * dtype_bytes(dtype)
    experts = config.moe.num_experts * moe_layers
    resident = weight_bytes - routed_bytes
    device_bytes = None if device_memory_gib is None else device_memory_gib * GIB
    cache = expert_memory_bytes if expert_memory_bytes is not None else device_bytes - resident
    return OffloadPlan(dtype, device_bytes, weight_bytes, resident, routed_bytes // experts,
                       experts, config.moe.top_k * moe_layers, cache, hit_rate)
