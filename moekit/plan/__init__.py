"""Planning: parameters, FLOPs, MFU, KV cache, memory, the scaling law and the upcycle advice.

Pure functions over a ModelConfig that return dataclasses; ``moekit plan`` prints them.
"""
from moekit.plan.advice import UpcycleAdvice, upcycle_advice, upcycle_or_scratch
from moekit.plan.devices import DEVICES, Device, device
from moekit.plan.flops import (TrainingCompute, TrainingFlops, Utilisation, training_compute,
                                training_flops_per_token, utilisation)
from moekit.plan.inference import (INFERENCE_DTYPES, InferenceMemory, OffloadPlan,
                                   inference_memory, offload_plan)
from moekit.plan.kv_cache import KVCachePlan, kv_cache_bytes_per_token, kv_cache_plan
from moekit.plan.params import ParameterCount, count_parameters
from moekit.plan.pipeline import StagePlan, plan_stages, uniform_stages
from moekit.plan.scaling import (BudgetPlan, active_params_for_budget, budget_plan,
                                 hunyuan_compute, tokens_for_budget)
from moekit.plan.training import Layout, Precision, TrainingMemory, training_memory
from moekit.plan.units import GIB

__all__ = ["DEVICES", "GIB", "INFERENCE_DTYPES", "BudgetPlan", "Device", "InferenceMemory",
           "OffloadPlan", "StagePlan", "plan_stages", "uniform_stages",
           "KVCachePlan", "Layout", "ParameterCount", "Precision", "TrainingCompute",
           "TrainingFlops", "TrainingMemory", "UpcycleAdvice", "Utilisation",
           "active_params_for_budget", "budget_plan", "count_parameters", "device",
           "hunyuan_compute", "inference_memory", "kv_cache_bytes_per_token", "kv_cache_plan",
           "offload_plan", "tokens_for_budget", "training_compute", "training_flops_per_token",
           "training_memory", "upcycle_advice", "upcycle_or_scratch", "utilisation"]
