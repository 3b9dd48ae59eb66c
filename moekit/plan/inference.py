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
from moekit.plan.params import count_parameters
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
