"""Placing a plain model's weights from outside: the non-uniform serving split over devices,
and experts offloaded to their checkpoint file with a cache in memory."""
from moekit.parallel.offload import ExpertCache, OffloadedExperts, expert_cache, load_for_serving
from moekit.parallel.serving_split import SplitPlan, plan_split, split_model

__all__ = ["ExpertCache", "OffloadedExperts", "SplitPlan", "expert_cache", "load_for_serving",
           "plan_split", "split_model"]
