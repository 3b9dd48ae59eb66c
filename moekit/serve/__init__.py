"""Serving: an OpenAI-compatible HTTP server over a moekit checkpoint."""
from moekit.serve.app import create_app
from moekit.serve.engine import Engine, Sampling
from moekit.serve.server import follow_checkpoint, load_engine, serve, serving_threads

__all__ = ["Engine", "Sampling", "create_app", "follow_checkpoint", "load_engine", "serve",
           "serving_threads"]
