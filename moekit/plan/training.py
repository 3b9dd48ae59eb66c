"""Memory per device for training under a data / tensor / pipeline / expert layout.

A layout of ``world_size = data * tensor * pipeline`` devices. Each pipeline stage holds a run
of layers (an even split, or ``stage_layers`` for a non-uniform one as Skywork-MoE uses), the
first stage the embedding, the last the final norm and the output projection (its own copy of
a tied embedding when there is more than one stage, as Megatron-LM keeps it). Tensor
parallelism splits attention, the dense and shared FFNs and the vocabulary matrices; norms and
routers are replicated. Expert parallelism spreads each MoE layer's experts over ``expert``
devices (whole experts) among the ``data * tensor`` devices of a stage.

Per device: weights, gradients and optimizer states (bytes per parameter: bf16 weights and
gradients, fp32 master weights + Adam's two moments = 12, by default), optionally sharded over
the data-parallel replicas of each parameter (ZeRO stage 1: optimizer states, 2: + gradients,
3: + weights); a non-expert parameter has ``data`` replicas, an expert parameter
``data * tensor / expert``. Activations (moekit.plan.activations) for the micro-batches in
flight under a 1F1B schedule: stage s of p holds p - s of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.plan.activations import first_stage_bytes, last_stage_bytes, layer_bytes
from moekit.plan.params import layer_parameters
from moekit.plan.units import dtype_bytes, require_positive


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    data: int = 1
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    stage_layers: tuple[int, ...] | None = None  # layers per pipeline stage; None = even split

    def __post_init__(self):
        for name in ("data", "tensor", "pipeline", "expert"):
            require_positive(name, getattr(self, name), integer=True)

    @classmethod
    def for_world(cls, world_size: int, tensor: int = 1, pipeline: int = 1, expert: int = 1,
                  stage_layers: tuple[int, ...] | None = None) -> "Layout":
        """The layout whose data-parallel degree fills ``world_size`` devices."""
        require_positive("world_size", world_size, integer=True)
        require_positive("tensor", tensor, integer=True)
        require_positive("pipeline", pipeline, integer=True)
        if world_size % (tensor * pipeline):
            raise ValueError(f"world_size={world_size} is not allowed: it must be a multiple of "
                             f"tensor x pipeline = {tensor} x {pipeline} = {tensor * pipeline}")
        return cls(world_size // (tensor * pipeline), tensor, pipeline, expert, stage_layers)

    @property
    def world_size(self) -> int:
        return self.data * self.tensor * self.pipeline

    @property
    def route_share(self) -> int:
        """Devices of an expert group that see the same tokens (its tensor-parallel part)."""
        return min(self.expert, self.tensor)

    def stages(self, config: ModelConfig) -> tuple[int, ...]:
        """Layers per stage, after checking that the layout fits the model."""
        self._check_tensor(config)
        self._check_expert(config)
        if self.pipeline > config.num_layers:
            raise ValueError(f"pipeline={self.pipeline} is not allowed: more stages than the "
                             f"model's {config.num_layers} layers")
        if self.stage_layers is None:
            if config.num_layers % self.pipeline:
                raise ValueError(f"pipeline={self.pipeline} does not divide num_layers="
                                 f"{config.num_layers}; choose a divisor or give the layers of "
                                 "each stage (stage_layers)")
            stages = (config.num_layers // self.pipeline,) * self.pipeline
        else:
            stages = tuple(self.stage_layers)
            if (len(stages) != self.pipeline or sum(stages) != config.num_layers
                    or any(not isinstance(n, int) or n < 1 for n in stages)):
                raise ValueError(f"stage_layers={list(stages)} is not allowed: expected "
                                 f"{self.pipeline} positive layer counts (one per pipeline "
                                 f"stage) summing to num_layers={config.num_layers}")
        cuts = [sum(stages[:s]) for s in range(1, len(stages))]
        if any(cut % config.cla_share for cut in cuts):
            raise ValueError(f"stage_layers={list(stages)} is not allowed: a stage would begin "
                             f"inside a CLA group of {config.cla_share} layers (stages begin at "
                             f"layers {cuts}); expected every cut at a multiple of "
                             f"{config.cla_share}")
        return stages

    def _check_tensor(self, config: ModelConfig) -> None:
        widths = {"num_heads": config.num_heads, "num_kv_heads": config.kv_heads,
                  "ffn_size": config.ffn_size}
        if config.moe is not None and config.moe.num_shared_experts:
            widths["shared expert width"] = config.moe.num_shared_experts * (
                config.moe.shared_ffn_size or config.moe.ffn_size)
        for name, width in widths.items():
            if width % self.tensor:
                raise ValueError(f"tensor={self.tensor} does not divide {name}={width}; the "
                                 "tensor-parallel degree must divide every split width")

    def _check_expert(self, config: ModelConfig) -> None:
        if self.expert == 1:
            return
        if config.moe is None:
            raise ValueError(f"expert={self.expert} is not allowed for a dense model: expected 1")
        if config.moe.num_experts % self.expert:
            raise ValueError(f"expert={self.expert} does not divide num_experts="
                             f"{config.moe.num_experts}")
        stage_devices = self.data * self.tensor
        if stage_devices % self.expert:
            raise ValueError(f"expert={self.expert} does not divide the {stage_devices} devices "
                             f"of a pipeline stage (data x tensor = {self.data} x {self.tensor})")
        if self.expert % self.tensor and self.tensor % self.expert:
            raise ValueError(f"expert={self.expert} and tensor={self.tensor}: one must divide "
                             "the other (an expert group takes whole tensor groups, or part of "
                             "one as in Skywork-MoE's EDP)")


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each training state, and the activations' number format."""

    weight_bytes: int = 2  # bf16 weights
    gradient_bytes: int = 2  # bf16 gradients
    optimizer_bytes: int = 12  # fp32 master weights + Adam's two moments
    activation_dtype: str = "bf16"
    zero_stage: int = 0  # 1: shard optimizer states, 2: + gradients, 3: + weights

    def __post_init__(self):
        for name in ("weight_bytes", "gradient_bytes", "optimizer_bytes"):
            require_positive(name, getattr(self, name), integer=True)
        dtype_bytes(self.activation_dtype)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r} is not allowed: one of 0, 1, 2, 3")


@dataclass(frozen=True)
class StageMemory:
    """One device of a pipeline stage, in bytes."""

    stage: int
    layers: int
    parameters: int  # held by the device (its share of the stage's weights)
    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    activations_recompute: float  # with full activation recomputation

    def total(self, recompute: bool) -> float:
        return (self.weights + self.gradients + self.optimizer_states
                + (self.activations_recompute if recompute else self.activations))


@dataclass(frozen=True)
class TrainingMemory:
    layout: Layout
    precision: Precision
    micro_batch: int
    seq_len: int
    recompute: bool
    stages: tuple[StageMemory, ...]

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total(self.recompute))

    @property
    def peak_bytes(self) -> float:
        return self.peak_stage.total(self.recompute)

    def to_dict(self) -> dict:
        return {"layout": {**self.layout.__dict__, "world_size": self.layout.world_size},
                "precision": dict(self.precision.__dict__), "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "recompute": self.recompute,
                "peak_stage": self.peak_stage.stage, "peak_bytes": self.peak_bytes,
                "stages": [{**stage.__dict__, "total": stage.total(self.recompute)}
                           for stage in self.stages]}


def _stage_parameters(config: ModelConfig, layout: Layout, first: int, count: int,
                      stage: int) -> tuple[int, int]:
    """(non-expert, expert) parameters that one device of the stage holds."""
    layers = [layer_parameters(config, i) for i in range(first, first + count)]
    split = _ceil_div(sum(p.attention + p.dense_ffn + p.shared_experts for p in layers),
                      layout.tensor)
    replicated = sum(p.norms + p.router for p in layers)
    experts = sum(p.routed_experts for p in layers) // layout.expert
    # Vocabulary-parallel embedding and output rows (padded up, as Megatron-LM pads them).
    vocab_matrix = _ceil_div(config.vocab_size, layout.tensor) * config.hidden_size
    last = stage == layout.pipeline - 1
    if stage == 0:
        split += vocab_matrix
    if last:
        replicated += config.hidden_size  # the final norm
        if not config.tie_embeddings or layout.pipeline > 1:
            split += vocab_matrix
    return split + replicated, experts


def _states(dense_params: int, expert_params: int, layout: Layout,
            precision: Precision) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes, each sharded over the data-parallel
    replicas of its parameters from its ZeRO stage on."""
    expert_replicas = layout.data * layout.tensor // layout.expert

    def state_bytes(bytes_per_param: int, sharded_from_zero_stage: int) -> float:
        if precision.zero_stage < sharded_from_zero_stage:
            return (dense_params + expert_params) * bytes_per_param
        return (dense_params / layout.data + expert_params / expert_replicas) * bytes_per_param

    return (state_bytes(precision.weight_bytes, 3), state_bytes(precision.gradient_bytes, 2),
            state_bytes(precision.optimizer_bytes, 1))


def training_memory(config: ModelConfig, layout: Layout = Layout(),
                    precision: Precision = Precision(), micro_batch: int = 1,
                    seq_len: int | None = None, recompute: bool = False) -> TrainingMemory:
    seq_len = config.max_seq_len if seq_len is None else seq_len
    require_positive("micro_batch", micro_batch, integer=True)
    require_positive("seq_len", seq_len, integer=True)
    b = dtype_bytes(precision.activation_dtype)
    tokens = micro_batch * seq_len
    stages, first = [], 0
    for stage, count in enumerate(layout.stages(config)):
        dense_params, expert_params = _stage_parameters(config, layout, first, count, stage)
        per_layer = [layer_bytes(config, i, b, layout.tensor, layout.route_share)
                     for i in range(first, first + count)]
        extras = ((first_stage_bytes(config, b) if stage == 0 else 0)
                  + (last_stage_bytes(config, b, layout.tensor)
                     if stage == layout.pipeline - 1 else 0))
        in_flight = layout.pipeline - stage
        activations = tokens * in_flight * (sum(per_layer) + extras)
        recomputed = tokens * (in_flight * (count * b * config.hidden_size + extras)
                               + max(per_layer))
        stages.append(StageMemory(stage, count, dense_params + expert_params,
                                  *_states(dense_params, expert_params, layout, precision),
                                  activations, recomputed))
        first += count
    return TrainingMemory(layout, precision, micro_batch, seq_len, recompute, tuple(stages))
