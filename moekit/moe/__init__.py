"""The MoE layer and its parts: gates, capacity, losses, dispatch, experts."""
from moekit.moe.assignment import balanced_assignment, sinkhorn
from moekit.moe.capacity import expert_capacity
from moekit.moe.dispatch import DispatchPlan, permute, plan_dispatch, unpermute
from moekit.moe.experts import (MLP, GroupedExperts, ModuleExperts, expert_activation, expert_mlp,
                                grouped_linear)
from moekit.moe.layer import MoELayer, MoEStats
from moekit.moe.multigate import MultiGateMoE
from moekit.moe.losses import (AdaptiveAuxCoefficient, router_z_loss, skywork_balance_loss,
                               switch_balance_loss)
from moekit.moe.router import (FASTMOE_NOISY_OPTIONS, GATES, BaseLayerGate, Gate, GShardGate,
                               LinearGate, NoisyTopKGate, Routing, SigmoidBiasGate, SinkhornGate,
                               SoftmaxTopKGate, ZeroGate, build_gate, smooth_load)

__all__ = [
    "AdaptiveAuxCoefficient", "BaseLayerGate", "DispatchPlan", "FASTMOE_NOISY_OPTIONS", "GATES",
    "GShardGate", "Gate", "GroupedExperts", "LinearGate", "MLP", "MoELayer", "MoEStats",
    "ModuleExperts", "MultiGateMoE", "NoisyTopKGate", "Routing", "SigmoidBiasGate", "SinkhornGate",
    "SoftmaxTopKGate", "ZeroGate", "balanced_assignment", "build_gate", "expert_activation",
    "expert_capacity", "expert_mlp", "grouped_linear", "permute", "plan_dispatch",
    "router_z_loss", "sinkhorn", "skywork_balance_loss", "smooth_load", "switch_balance_loss",
    "unpermute",
]
