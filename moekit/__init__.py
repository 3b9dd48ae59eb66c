"""moekit: build, convert, train, plan and serve Mixture-of-Experts language models."""
from moekit.config import MoEConfig
from moekit.moe import Gate, GroupedExperts, ModuleExperts, MoELayer, MoEStats, Routing
from moekit.convert.moefy import moefy  # FastMoE's one-liner, as moekit.moefy

__version__ = "0.1.0"

__all__ = ["Gate", "GroupedExperts", "ModuleExperts", "MoEConfig", "MoELayer", "MoEStats",
           "Routing", "__version__", "moefy"]
