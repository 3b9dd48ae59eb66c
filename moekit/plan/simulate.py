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
  (X - 1) / X rows of D numbers for its T tokens;
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
- 1F1B: the step is the slowest stage's work times (m + p - 1) / m, the bubble the rest.
Communication is not overlapped with compute (an upper bound); each collective also pays its
link's latency once per message. A link is the inside-node one when the group fits a node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.config import ModelConfig
from moekit.plan.flops import training_flops_per_token
from moekit.plan.params import count_parameters
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

    def __post_init__(self):
        require_positive("flops", self.flops)
        require_positive("devices_per_node", self.devices_per_node, integer=True)
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
    bubble: float
    step: float
    tokens_per_device_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def simulate_step(config: ModelConfig, layout: Layout, machine: Machine, micro_batch: int,
                  seq_len: int, micro_batches: int, recompute: bool = False,
                  bytes_per_number: int = 2) -> StepPrediction:
    """Seconds of one step on each part (see the module's model)."""
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("micro_batches", micro_batches)):
        require_positive(name, value, integer=True)
    stages = layout.stages(config)
    tokens = micro_batch * seq_len  # one micro-batch of one replica
    flops = training_flops_per_token(config, seq_len)
    layer_share = max(stages) / config.num_layers  # the slowest stage, by layers
    recompute_factor = 1 + (1 / 3 if recompute else 0)
    rate = machine.flops * machine.efficiency * layout.tensor
    compute = micro_batches * tokens * flops.model_flops * layer_share * recompute_factor / rate

    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
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
        per_layer = 4 * machine.link(expert).seconds(row_bytes, messages=expert - 1)
        all_to_all = micro_batches * per_layer * moe_layers * layer_share

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

    busy = compute + tensor_parallel + all_to_all + point_to_point
    bubble = busy * (layout.pipeline - 1) / micro_batches
    step = busy + bubble + all_reduce
    device_tokens = micro_batches * tokens * layout.data / layout.world_size
    return StepPrediction(compute, tensor_parallel, all_to_all, all_reduce, point_to_point,
                          bubble, step, device_tokens / step)


def _ring(nbytes: float, members: int, link: Link) -> float:
    if members <= 1:
        return 0.0
    return link.seconds(2 * (members - 1) / members * nbytes, messages=2 * (members - 1))
