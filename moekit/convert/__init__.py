"""Conversion between moekit and other layouts (Hugging Face, dense checkpoints)."""
