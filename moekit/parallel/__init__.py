"""Parallelism applied to a plain model from outside: the non-uniform serving split."""
from moekit.parallel.serving_split import SplitPlan, plan_split, split_model

__all__ = ["SplitPlan", "plan_split", "split_model"]
