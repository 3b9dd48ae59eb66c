"""What the server is doing, live: Prometheus metrics (``/metrics``, with ``prometheus_client``)
and the per-request routing log (``--log-routing FILE``, JSON lines).

Routed tokens are counted per MoE layer and expert from the routers' own decisions (a forward
hook on each layer's gate records its expert ids), so an operator sees hot and cold experts
under real traffic; every (layer, expert) pair is exported from the start, at 0 until used.
A model served with offloaded experts (``--expert-memory``) also exports its expert cache's
hits, misses and bytes loaded, read from the cache at each scrape.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moekit.moe import MoELayer
from moekit.parallel import ExpertCache, expert_cache

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServeMetrics:
    """One server's metrics, in a registry of their own (so that several engines in one
    process do not mix)."""

    def __init__(self, model):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("moekit_requests", "Requests by how they ended (ok, an HTTP "
                                "status, cancelled: the client left, overloaded: refused with "
                                "429)", ["status"], registry=registry)
        self.prompt_tokens = Counter("moekit_prompt_tokens", "Prompt tokens of finished "
                                     "requests", registry=registry)
        self.generation_tokens = Counter("moekit_generation_tokens", "Tokens generated",
                                         registry=registry)
        self.queue_length = Gauge("moekit_queue_length", "Requests waiting for KV blocks or "
                                  "batch rows", registry=registry)
        self.batch_size = Gauge("moekit_batch_size", "Sequences in the running batch",
                                registry=registry)
        self.kv_blocks_used = Gauge("moekit_kv_blocks_used", "KV cache blocks held by "
                                    "running sequences", registry=registry)
        self.kv_blocks_total = Gauge("moekit_kv_blocks_total", "KV cache blocks in the pool",
                                     registry=registry)
        self.time_to_first_token = Histogram(
            "moekit_time_to_first_token_seconds", "From arrival to the first token",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "moekit_inter_token_latency_seconds", "Between a request's successive tokens",
            buckets=LATENCY_BUCKETS, registry=registry)
        routed = Counter("moekit_routed_tokens", "Token routes to each expert of each MoE "
                         "layer", ["layer", "expert"], registry=registry)
        self._routes: dict[int, torch.Tensor | None] = {}
        self._routed_children = {}
        self._hooks = []
        for number, block in model.layers.numbered():
            if isinstance(block.ffn, MoELayer):
                experts = block.ffn.config.num_experts
                self._routes[number] = None
                self._routed_children[number] = [routed.labels(layer=str(number),
                                                               expert=str(e))
                                                 for e in range(experts)]
                self._hooks.append(
                    block.ffn.router.register_forward_hook(self._recorder(number)))
        self._pair_children = [child for children in self._routed_children.values()
                               for child in children]
        cache = expert_cache(model)
        if cache is not None:
            registry.register(ExpertCacheCollector(cache))

    def _recorder(self, number: int):
        def record(module, inputs, routing):
            self._routes[number] = routing.expert_ids_TK
        return record

    def count_routing(self) -> list[tuple[torch.Tensor, int]]:
        """Count the last forward's routes into the metrics, and return them per MoE layer:
        (expert ids [T, K], number of experts). Counted for all layers at once, (layer,
        expert) pairs numbered one after the other, so that the counts come to the host in
        one transfer."""
        routes = [(self._routes[number], len(children))
                  for number, children in self._routed_children.items()]
        if not routes:
            return routes
        firsts = itertools.accumulate((experts for _, experts in routes[:-1]), initial=0)
        pair_ids = torch.cat([expert_ids_TK.flatten() + first
                              for (expert_ids_TK, _), first in zip(routes, firsts)])
        counts = pair_ids.bincount(minlength=len(self._pair_children)).tolist()
        for child, count in zip(self._pair_children, counts):
            if count:
                child.inc(count)
        return routes

    def close(self) -> None:
        """Take the hooks off the model's gates."""
        for hook in self._hooks:
            hook.remove()

    @property
    def moe_layers(self) -> list[int]:
        return list(self._routes)

    def token_times(self, submitted: float, last_token_at: float | None, now: float) -> None:
        if last_token_at is None:
            self.time_to_first_token.observe(now - submitted)
        else:
            self.inter_token_latency.observe(now - last_token_at)

    def update_load(self, waiting: int, batch: int, used_blocks: int) -> None:
        self.queue_length.set(waiting)
        self.batch_size.set(batch)
        self.kv_blocks_used.set(used_blocks)

    def finished(self, status: str, usage=None) -> None:
        self.requests.labels(status=status).inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.generation_tokens.inc(usage.completion_tokens)


class ExpertCacheCollector:
    """The offloaded experts' cache, as Prometheus metrics: counters of hits, misses (experts
    loaded from the file) and bytes loaded, and the cache's size."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache

    def collect(self):
        cache = self.cache
        for name, text, value in (
                ("hits", "Expert lookups served from memory", cache.hits),
                ("misses", "Expert lookups that loaded the expert from the file", cache.misses),
                ("loaded_bytes", "Bytes of expert weights loaded from the file",
                 cache.bytes_loaded)):
            yield CounterMetricFamily(f"moekit_expert_cache_{name}", text, value=value)
        yield GaugeMetricFamily("moekit_expert_cache_slots", "Experts the cache holds at once "
                                "(--expert-memory // bytes of one expert)", value=cache.num_slots)


class RoutingLog:
    """One JSON line per finished request: its token counts and, per MoE layer (``layers``),
    how many of its tokens' routes went to each expert (prefill and decoding together).
    The file is written anew (``moekit serve`` refuses an existing one without --overwrite);
    each line is flushed when written."""

    def __init__(self, path: str | Path, moe_layers: list[int]):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.moe_layers = moe_layers

    def write(self, ticket, status: str) -> None:
        routed = [] if ticket.routed_LE is None else ticket.routed_LE.tolist()
        self.file.write(json.dumps({
            "request": ticket.id, "time": round(time.time(), 3), "status": status,
            "prompt_tokens": ticket.usage.prompt_tokens,
            "completion_tokens": ticket.usage.completion_tokens,
            "layers": self.moe_layers, "routed_tokens": routed}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
