"""Conversion between moekit and other layouts (Hugging Face, dense checkpoints)."""
from moekit.convert.hf import LAYOUTS, check_exportable, transformer_from_hf
from moekit.convert.hf_folder import export_hf, import_hf, load_hf
from moekit.convert.moefy import (FFNAdapter, MoEFeedForward, moe_stats, moefy, router_loss,
                                  update_router_state)
from moekit.convert.upcycle import upcycle

__all__ = ["FFNAdapter", "LAYOUTS", "MoEFeedForward", "check_exportable", "export_hf",
           "import_hf", "load_hf", "moe_stats", "moefy", "router_loss", "update_router_state", "transformer_from_hf",
           "upcycle"]
