"""Planning: parameters, FLOPs, MFU, KV cache, memory, the scaling law and the upcycle advice."""
from moekit.plan.advice import UpcycleAdvice, upcycle_advice

__all__ = ["UpcycleAdvice", "upcycle_advice"]
