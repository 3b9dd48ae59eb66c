"""A step-time simulator: what one training step of a layout costs, part by part.

Inputs are stated, never fitted: a device's matmul rate and the share of it the model's FLOPs
reach (``efficiency``), and per link level (inside a node, between nodes) a bandwidth and a
latency. For a step of ``micro_batches`` micro-batches of ``micro_batch`` sequences of
``seq_len`` tokens on each data-parallel replica:

- compute: the model FLOPs of the device's tokens (``training_flops_per_token``: 6 (N + V D) +
  attention, with N active parameters) over the pipeline stages, at ``efficiency`` of the
  rate; recomputation adds each layer's forward once more (a third of its training FLOPs);
- all-to-all (expert parallelism): per MoE layer and micro-batch, forward and back, twice with
  the backward, the rows a device sends to the other X - 1 ranks of its expert group: T K
  (X - 1) / X rows of D numbers for its T tokens; before them, the exchange of the per-expert
  counts (E / X int64 to each peer). On the machine's ``all_to_all`` link where it is given
  (gloo's all-to-all of messages this size runs at its own rate), else the group's level's;
- tensor parallelism: per layer and micro-batch, four ring all-reduces of the T x D
  activations over the tensor group (attention's and the FFN's outputs, forward and backward,
  as Megatron-LM); under expert data parallelism (Skywork-MoE's EDP: the experts spread over
  the tensor group, which holds the same tokens) the FFN's is the experts' and no all-to-all
  is needed;
- all-reduce of the replicated gradients over the data-parallel replicas, as a ring: 2 (R - 1)
  / R of their bytes each way; the experts' over their R / X replicas; ZeRO-1 the same bytes
  (reduce-scatter + all-gather);
- point-to-point (pipeline): each micro-batch's activations cross every stage boundary
  forward and its gradient back;
- dispatch (given the device's ``copy_bandwidth``): per MoE layer and micro-batch, the rows
  of D numbers the token permutation reads and writes (``moekit.moe.dispatch``): 10 per kept
  route and 2 per token on every layout (``LOCAL_DISPATCH_ROW_PASSES``), and under expert
  parallelism 8 per row a device receives, to regroup the arrived rows by expert and back
  (``EXCHANGE_REGROUP_ROW_PASSES``); a recomputed forward's copies are not counted;
- load imbalance (``expert_load``: per MoE layer, the rows the busiest rank of an expert group
  computes over the group's mean): every rank waits at the layer's next exchange for the
  busiest, so the step pays that rank's expert compute (its share of the training FLOPs, 6
  times the layer's active expert parameters per token) and its regroup copies. 1 (the
  default) is a perfect balance; a capacity factor c bounds it by c;
- 1F1B: the step is the slowest stage's work times (m + p - 1) / m, the bubble the rest.
Communication is not overlapped with compute (an upper bound); each collective also pays its
link's latency once per message. A link is the inside-node one when the group fits a node.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from moekit.config import ModelConfig
from moekit.plan.flops import training_flops_per_token
from moekit.plan.params import count_parameters, layer_parameters
from moekit.plan.training import Layout
from moekit.plan.units import require_positive


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second, one direction, per device
    latency: float = 0.0  # seconds per message

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return nbytes / self.bandwidth + messages * self.latency


@dataclass(frozen=True)
class Machine:
    flops: float  # the device's dense matmul rate, FLOP/s, in the training dtype
    efficiency: float  # the share of it that the model's FLOPs reach
    devices_per_node: int
    inside_node: Link
    between_nodes: Link
    # Bytes a row gather reads and writes per second (the dispatch's copies); None: not
    # modelled (free).
    copy_bandwidth: float | None = None
    # The link the expert all-to-all sees, measured with its own messages, where it differs
    # from the level's (one level: a machine like the benchmark's); None: the level's.
    all_to_all: Link | None = None

    def __post_init__(self):
        require_positive("flops", self.flops)
        require_positive("devices_per_node", self.devices_per_node, integer=True)
        if self.copy_bandwidth is not None:
            require_positive("copy_bandwidth", self.copy_bandwidth)
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency={self.efficiency!r} is not allowed: expected a "
                             "number in (0, 1]")

    def link(self, group_span: int) -> Link:
        """The slowest link a group of ``group_span`` consecutive devices uses."""
        return self.inside_node if group_span <= self.devices_per_node else self.between_nodes


@dataclass(frozen=True)
class StepPrediction:
    compute: float
    tensor_parallel: float
    all_to_all: float
    all_reduce: float
    point_to_point: float
    dispatch: float
    imbalance: float
    bubble: float
    step: float
    tokens_per_device_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


# Rows of D numbers the permutation reads or writes per MoE layer and micro-batch
# (moekit/moe/dispatch.py). Per kept route: the gather by expert (read, write), the weighted sum
# back (read); in the backward the gather of the token gradients (read, write), the gate
# weights' dot products (two reads), the scaling by the gate weight (read, write) and the sum
# back (read). Per token: the two sums' outputs.
LOCAL_DISPATCH_ROW_PASSES = {"route": 10, "token": 2}
# Per row an expert-parallel rank receives (moekit/parallel/expert_parallel.py): the gather
# into expert order and the copy back into sender order (a read and a write each), and both
# again in the backward.
EXCHANGE_REGROUP_ROW_PASSES = 8


def simulate_step(config: ModelConfig, layout: Layout, machine: Machine, micro_batch: int,
                  seq_len: int, micro_batches: int, recompute: bool = False,
                  bytes_per_number: int = 2,
                  expert_load: float | Sequence[float] = 1.0) -> StepPrediction:
    """Seconds of one step on each part (see the module's model). ``expert_load``: one value
    for every MoE layer, or one per MoE layer (each >= 1)."""
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("micro_batches", micro_batches)):
        require_positive(name, value, integer=True)
    stages = layout.stages(config)
    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    loads = _expert_loads(expert_load, len(moe_layers))
    tokens = micro_batch * seq_len  # one micro-batch of one replica
    flops = training_flops_per_token(config, seq_len)
    layer_share = max(stages) / config.num_layers  # the slowest stage, by layers
    recompute_factor = 1 + (1 / 3 if recompute else 0)
    rate = machine.flops * machine.efficiency * layout.tensor
    compute = micro_batches * tokens * flops.model_flops * layer_share * recompute_factor / rate

    expert = layout.expert
    tensor_parallel = 0.0
    if layout.tensor > 1:
        activations = tokens * config.hidden_size * bytes_per_number
        tensor_parallel = (micro_batches * max(stages) * 4
                           * _ring(activations, layout.tensor, machine.link(layout.tensor)))
    all_to_all = 0.0
    edp = layout.route_share == expert  # the expert group shares its tokens (EDP)
    if expert > 1 and config.moe is not None and not edp:
        rows = tokens * config.moe.top_k * (expert - 1) / expert
        row_bytes = rows * config.hidden_size * bytes_per_number
        count_bytes = config.moe.num_experts // expert * 8 * (expert - 1)
        link = machine.all_to_all or machine.link(expert)
        per_layer = (4 * link.seconds(row_bytes, messages=expert - 1)
                     + link.seconds(count_bytes, messages=expert - 1))
        all_to_all = micro_batches * per_layer * len(moe_layers) * layer_share

    # A stage's share of the MoE layers, each at its own load (the mean over layers).
    stage_moe_layers = len(moe_layers) * layer_share
    mean_load = sum(loads) / len(loads) if loads else 1.0
    dispatch = imbalance = 0.0
    if config.moe is not None:
        routes = tokens * config.moe.top_k
        received = routes * mean_load if expert > 1 and not edp else 0  # the busiest rank's
        passes = (LOCAL_DISPATCH_ROW_PASSES["route"] * routes
                  + LOCAL_DISPATCH_ROW_PASSES["token"] * tokens
                  + EXCHANGE_REGROUP_ROW_PASSES * received)
        if machine.copy_bandwidth is not None:
            row_bytes = config.hidden_size * bytes_per_number
            dispatch = (micro_batches * stage_moe_layers * passes * row_bytes
                        / machine.copy_bandwidth)
        if expert > 1:
            expert_flops = sum(6 * layer_parameters(config, i).routed_experts_active
                               for i in moe_layers) / len(moe_layers)
            excess = sum(load - 1 for load in loads) / len(loads)
            imbalance = (micro_batches * tokens * expert_flops * stage_moe_layers * excess
                         * recompute_factor / rate)

    params = count_parameters(config)
    expert_params = params.component("routed_experts").total if config.moe is not None else 0
    replicated = (params.total - expert_params) / (layout.pipeline * layout.tensor)
    span = layout.world_size
    all_reduce = _ring(replicated * bytes_per_number, layout.data, machine.link(span))
    if expert > 1:
        all_reduce += _ring(expert_params / (expert * layout.pipeline) * bytes_per_number,
                            layout.data // expert, machine.link(span))
    else:
        all_reduce += _ring(expert_params / layout.pipeline * bytes_per_number, layout.data,
                            machine.link(span))

    point_to_point = 0.0
    if layout.pipeline > 1:
        boundary = tokens * config.hidden_size * bytes_per_number
        point_to_point = micro_batches * 2 * machine.link(span).seconds(boundary)

    busy = compute + tensor_parallel + all_to_all + point_to_point + dispatch + imbalance
    bubble = busy * (layout.pipeline - 1) / micro_batches
    step = busy + bubble + all_reduce
    device_tokens = micro_batches * tokens * layout.data / layout.world_size
    return StepPrediction(compute, tensor_parallel, all_to_all, all_reduce, point_to_point,
                          dispatch, imbalance, bubble, step, device_tokens / step)


def _expert_loads(expert_load: float | Sequence[float], moe_layers: int) -> list[float]:
    loads = ([expert_load] * moe_layers if isinstance(expert_load, (int, float))
             else list(expert_load))
    if len(loads) != moe_layers or not all(
            isinstance(load, (int, float)) and 1 <= load < float("inf") for load in loads):
        raise ValueError(f"expert_load={expert_load!r} is not allowed: expected a number >= 1 "
                         f"(the busiest rank's rows over the mean), or {moe_layers} of them, "
                         "one per MoE layer")
    return loads


def _ring(nbytes: float, members: int, link: Link) -> float:
    if members <= 1:
        return 0.0
    return link.seconds(2 * (members - 1) / members * nbytes, messages=2 * (members - 1))
