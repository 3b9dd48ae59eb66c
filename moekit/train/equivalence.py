"""The equivalence matrix's building blocks: one training step's loss, statistics and gradients
under a layout, and their comparison with the single-process step (docs/correctness.md).

``step_outcome`` builds the model from a seed (the same weights on every rank and layout), runs
``train_step`` on a given global batch, and returns what the step computed: the logged figures
and every parameter's gradient as the optimizer received it (after the data-parallel reduction
and clipping). ``compare`` gives one ``Check`` per figure: the largest difference relative to
the reference's magnitude.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moekit.config import MLAConfig, ModelConfig, TrainConfig
from moekit.model import Transformer
from moekit.parallel.mesh import Mesh
from moekit.parallel.parallelize import parallelize, whole_tensors
from moekit.parallel.pipeline import check_pipeline_model
from moekit.parallel.tensor_parallel import check_tensor_model
from moekit.plan.training import Layout
from moekit.parallel.processes import run_on_ranks
from moekit.train.step import IGNORE_INDEX, train_step


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer that only keeps a copy of each gradient it is asked to apply."""

    def __init__(self, named_parameters):
        named = list(named_parameters)
        super().__init__([p for _, p in named], {})
        self.names = {id(p): name for name, p in named}
        self.gradients: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self.gradients[self.names[id(parameter)]] = parameter.grad.detach().clone()


@dataclass
class StepOutcome:
    figures: dict[str, torch.Tensor]  # loss, router_loss, grad_norm, drop_rate, expert_load
    gradients: dict[str, torch.Tensor]


def step_outcome(model_config: ModelConfig, train_config: TrainConfig, inputs: torch.Tensor,
                 targets: torch.Tensor, mask: torch.Tensor | None = None, mesh: Mesh = Mesh(),
                 seed: int = 0, dtype: torch.dtype = torch.float64,
                 prepare=None) -> StepOutcome:
    """``prepare(model)``, when given, adjusts the freshly built model (a test forcing a
    routing, say) before the layout is applied."""
    torch.manual_seed(seed)
    model = Transformer(model_config).to(dtype).train()
    if prepare is not None:
        prepare(model)
    model.recompute = train_config.recompute
    parallel_model = parallelize(model, mesh)
    recorder = GradientRecorder(model.named_parameters())
    record = train_step(parallel_model, recorder, inputs, targets, train_config, mesh, mask)
    figures = {key: torch.tensor(record[key], dtype=torch.float64)
               for key in ("loss", "router_loss", "grad_norm", "drop_rate", "expert_load")}
    # Each sharded expert gradient gathered whole, and every stage's, to compare with one
    # process's (on rank 0).
    gradients = whole_tensors(recorder.gradients, model, mesh)
    return StepOutcome(figures=figures, gradients=gradients)


@dataclass
class Check:
    name: str
    difference: float  # max |got - want| / max(max |want|, floor)
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.difference <= self.tolerance


def relative_difference(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    """Largest elementwise difference relative to the reference tensor's largest magnitude
    (normwise, so that entries near zero are judged at the tensor's scale), at least ``floor``
    in the denominator (a tensor that is zero everywhere is compared absolutely)."""
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    scale = max(float(want.abs().max()), floor)
    return float((got.double() - want.double()).abs().max()) / scale


def compare(got: StepOutcome, want: StepOutcome, tolerance: float,
            floor: float = 1e-12) -> list[Check]:
    """One check per figure and one for all gradients together (the worst tensor)."""
    checks = [Check(name, relative_difference(got.figures[name], value, floor), tolerance)
              for name, value in want.figures.items()]
    missing = set(want.gradients) ^ set(got.gradients)
    worst = float("inf") if missing else max(
        relative_difference(got.gradients[name], value, floor)
        for name, value in want.gradients.items())
    return checks + [Check("gradients", worst, tolerance)]


# ---- The matrix on a user's configuration (``moekit check``) -------------------------------

MAX_WIDTH = 64  # hidden and FFN widths above this are shrunk: a layout then takes seconds
MAX_VOCAB = 256
# float64: summation order alone moves ~1e-13 here; float32: measured up to ~1e-6 on the tiny
# preset's widths, so 1e-4 leaves room for other shapes (docs/correctness.md).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}


def shrink(config: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """A configuration small enough to check on a CPU in seconds, and what was changed. Routing
    (router, experts, top-k, losses) is kept; only depth and widths shrink."""
    changes, fields = [], {}
    if config.hidden_size > MAX_WIDTH:
        heads = min(config.num_heads, 4)
        grouping = max(1, round(heads * config.kv_heads / config.num_heads))  # GQA kept
        kv_heads = next(g for g in range(grouping, 0, -1) if heads % g == 0)
        fields.update(hidden_size=heads * 8, num_heads=heads, head_dim=None,
                      num_kv_heads=None if config.mla is not None else kv_heads)
        changes.append(f"hidden_size {config.hidden_size} -> {heads * 8}" + (
            f", heads {config.num_heads}/{config.kv_heads} -> {heads}/{kv_heads}"
            if (heads, kv_heads) != (config.num_heads, config.kv_heads) else ""))
    depth = max(config.moe_every, config.cla_share) * 2
    for name, limit in (("ffn_size", MAX_WIDTH), ("num_layers", depth),
                        ("vocab_size", MAX_VOCAB)):
        if getattr(config, name) > limit:
            fields[name] = limit
            changes.append(f"{name} {getattr(config, name)} -> {limit}")
    if config.mla is not None and config.mla.kv_lora_rank > MAX_WIDTH // 4:
        fields["mla"] = MLAConfig(kv_lora_rank=MAX_WIDTH // 4, qk_nope_head_dim=8,
                                  qk_rope_head_dim=4, v_head_dim=8,
                                  q_lora_rank=config.mla.q_lora_rank and MAX_WIDTH // 4)
        changes.append(f"latent attention {config.mla.kv_lora_rank} -> {MAX_WIDTH // 4} "
                       "(heads 8 + 4, values 8)")
    layers = fields.get("num_layers", config.num_layers)
    if any(index >= layers - 1 for index in config.dense_layers):
        # Kept below the last layer, so that the shrunk model still has an MoE layer.
        fields["dense_layers"] = tuple(i for i in config.dense_layers if i < layers - 1)
    if config.moe is not None:
        moe = config.moe
        widths = dict(hidden_size=fields.get("hidden_size", config.hidden_size),
                      ffn_size=min(moe.ffn_size, MAX_WIDTH // 2),
                      shared_ffn_size=None if moe.shared_ffn_size is None
                      else min(moe.shared_ffn_size, MAX_WIDTH))
        if widths["ffn_size"] != moe.ffn_size:
            changes.append(f"expert ffn_size {moe.ffn_size} -> {widths['ffn_size']}")
        fields["moe"] = replace(moe, **widths)
    return replace(config, **fields), changes


@dataclass
class CheckLayout:
    """One cut of the reference batch: ``ranks`` processes in ``pipeline`` stages,
    ``grad_accum`` micro-batches each, padded rows or not, recomputed layers or not."""

    name: str
    ranks: int = 1
    expert: int = 1  # of a stage's ranks, how many share each layer's experts
    grad_accum: int = 1
    padded: bool = False
    recompute: bool = False
    pipeline: int = 1  # stages, of the even split
    tensor: int = 1  # EDP: expert = tensor ranks share their rows
    zero: int = 0  # 2, 3: FSDP2 (the gradients, and for 3 the parameters, sharded)

    def layout(self) -> Layout:
        return Layout(data=self.ranks // (self.tensor * self.pipeline), tensor=self.tensor,
                      pipeline=self.pipeline, expert=self.expert)


LAYOUTS = (CheckLayout("gradient accumulation 4", grad_accum=4),
           CheckLayout("padded batch", padded=True),
           CheckLayout("recomputed layers", recompute=True),
           CheckLayout("data parallel 2", ranks=2),
           CheckLayout("data parallel 2 x accumulation 2", ranks=2, grad_accum=2),
           CheckLayout("expert parallel 2", ranks=2, expert=2),
           CheckLayout("expert parallel 2, padded", ranks=2, expert=2, padded=True),
           CheckLayout("data parallel 2, ZeRO-2", ranks=2, zero=2),
           CheckLayout("data parallel 2 x accumulation 2, ZeRO-3", ranks=2, grad_accum=2, zero=3),
           CheckLayout("pipeline 2", ranks=2, pipeline=2),
           CheckLayout("pipeline 2 x accumulation 2 (1F1B), padded", ranks=2, pipeline=2,
                       grad_accum=2, padded=True),
           CheckLayout("data parallel 4", ranks=4),
           CheckLayout("expert parallel 4", ranks=4, expert=4),
           CheckLayout("data 2 x expert 2", ranks=4, expert=2),
           CheckLayout("data 2 x expert 2, ZeRO-3", ranks=4, expert=2, zero=3),
           CheckLayout("expert data parallel 2", ranks=2, expert=2, tensor=2),
           CheckLayout("data 2 x pipeline 2", ranks=4, pipeline=2),
           CheckLayout("pipeline 2 x expert 2", ranks=4, pipeline=2, expert=2),
           CheckLayout("data 2 x expert data parallel 2, padded", ranks=4, expert=2, tensor=2,
                       padded=True),
           CheckLayout("data 2 x expert data parallel 2, ZeRO-3", ranks=4, expert=2, tensor=2,
                       zero=3),
           CheckLayout("pipeline 2 x expert data parallel 2", ranks=4, pipeline=2, expert=2,
                       tensor=2))


def reference_batch(config: ModelConfig, rows: int = 8, seq: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (rows, seq + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def left_padded(inputs: torch.Tensor, targets: torch.Tensor, pads: list[int]):
    """The same rows with ``pads[i]`` padding positions before row i (and as many after the
    rows with less, so that all have one length): inputs, targets (IGNORE_INDEX where padded)
    and the valid-token mask."""
    width = inputs.shape[1] + max(pads)
    padded_inputs = torch.zeros(len(inputs), width, dtype=inputs.dtype)
    padded_targets = torch.full_like(padded_inputs, IGNORE_INDEX)
    mask = torch.zeros(len(inputs), width, dtype=torch.bool)
    for row, pad in enumerate(pads):
        columns = slice(pad, pad + inputs.shape[1])
        padded_inputs[row, columns], padded_targets[row, columns] = inputs[row], targets[row]
        mask[row, columns] = True
    return padded_inputs, padded_targets, mask


@dataclass
class MatrixRow:
    layout: str
    checks: list[Check] | None  # None: skipped
    note: str = ""


def _exact_setting(config: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """Routing made a function of the global batch alone: dropless (a capacity is per rank and
    per micro-batch) and without jitter (its noise is drawn per rank)."""
    if config.moe is None:
        return config, []
    changes = []
    moe = config.moe
    if moe.capacity_factor is not None:
        changes.append(f"capacity_factor {moe.capacity_factor} -> dropless")
    if moe.jitter:
        changes.append(f"jitter {moe.jitter} -> 0")
    return replace(config, moe=replace(moe, capacity_factor=None, jitter=0.0)), changes


def _layout_outcome(model_config, train_config, layout: CheckLayout, mesh: Mesh,
                    dtype: torch.dtype) -> StepOutcome:
    inputs, targets = reference_batch(model_config)
    batch = (left_padded(inputs, targets, [0, 3, 1, 5, 2, 0, 4, 1]) if layout.padded
             else (inputs, targets, None))
    config = replace(train_config, grad_accum=layout.grad_accum, recompute=layout.recompute)
    return step_outcome(model_config, config, *batch, mesh=mesh, dtype=dtype)


def _ranks_outcomes(rank, world, model_config, train_config, layouts, dtype):
    from moekit.parallel.mesh import world_mesh
    shapes = sorted({(layout.expert, layout.pipeline, layout.tensor) for layout in layouts})
    meshes = {(expert, pipeline, tensor): world_mesh(
        expert=expert, pipeline=pipeline, tensor=tensor,
        stage_layers=Layout(pipeline=pipeline).stages(model_config) if pipeline > 1 else None)
        for expert, pipeline, tensor in shapes}
    return [_layout_outcome(model_config, train_config, layout,
                            replace(meshes[layout.expert, layout.pipeline, layout.tensor],
                                    zero=layout.zero), dtype)
            for layout in layouts]


def _unfit(config: ModelConfig, layout: CheckLayout) -> str | None:
    """Why ``config`` cannot take ``layout`` (None when it can)."""
    try:
        layout.layout().stages(config)
        check_pipeline_model(config, layout.pipeline)
        check_tensor_model(config, layout.tensor)
    except ValueError as error:
        return str(error)
    return None


def run_matrix(model_config: ModelConfig, nproc: int, dtype: torch.dtype = torch.float64,
               timeout: float = 300.0) -> tuple[list[MatrixRow], list[str]]:
    """Every layout that ``nproc`` processes allow, each against one process on the same
    global batch (lb_scope "step"); and what was changed in the configuration to run it."""
    model_config, changes = shrink(model_config)
    model_config, exact = _exact_setting(model_config)
    train_config = TrainConfig(batch_size=8, seq_len=12, grad_clip=None, lb_scope="step")
    reference = _layout_outcome(model_config, train_config, CheckLayout("one process"), Mesh(), dtype)
    tolerance = TOLERANCES[dtype]
    rows = []
    for ranks in sorted({layout.ranks for layout in LAYOUTS}):
        layouts = [layout for layout in LAYOUTS if layout.ranks == ranks]
        if ranks > nproc:
            rows += [MatrixRow(layout.name, None, f"needs {ranks} processes") for layout in layouts]
            continue
        unfit = [layout for layout in layouts if _unfit(model_config, layout)]
        rows += [MatrixRow(layout.name, None, _unfit(model_config, layout)) for layout in unfit]
        layouts = [layout for layout in layouts if layout not in unfit]
        if ranks == 1:
            outcomes = [_layout_outcome(model_config, train_config, layout, Mesh(), dtype)
                        for layout in layouts]
        else:
            outcomes = run_on_ranks(_ranks_outcomes, ranks, model_config, train_config, layouts,
                                    dtype, timeout=timeout)[0]
        rows += [MatrixRow(layout.name, compare(outcome, reference, tolerance))
                 for layout, outcome in zip(layouts, outcomes)]
    return rows, changes + exact
