"""Pipeline parallelism: the model cut into stages of consecutive layers, one stage per rank of
a ``pp`` group, run by ``torch.distributed.pipelining``'s schedules (1F1B, or GPipe when a
step has fewer micro-batches than stages).

A stage keeps the model's own modules and names (``layers.N``, ``embed_tokens`` on the first
stage, ``norm`` and ``lm_head`` on the last), so that its weights, gradients and optimizer state
are named as the whole model's and a checkpoint does not depend on the cut. Between stages only
tensors travel: the hidden states; the padding mask goes to every stage with its micro-batch,
each stage deriving positions and the attention mask from it. Cuts fall between CLA groups
(``Layout.stages`` checks it), so shared keys and values never cross a stage.

What a stage measures besides its output (the MoE layers' statistics, their router-loss share)
reaches the training step through two hooks the step sets (``StageModule.after_layers`` and
``loss``): this layer of the package knows no loss.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.parallel.mesh import Mesh, collective


def stage_bounds(stage_layers: tuple[int, ...], stage: int) -> range:
    """The layer numbers of ``stage``."""
    start = sum(stage_layers[:stage])
    return range(start, start + stage_layers[stage])


def check_pipeline_model(config, pipeline: int) -> None:
    """What a model must be to train on ``pipeline`` stages, beyond ``Layout.stages``' checks."""
    if pipeline > 1 and config.tie_embeddings:
        raise ValueError(f"pipeline={pipeline} is not allowed with tie_embeddings: the first "
                         "and last stages would each hold the one matrix, which moekit's "
                         "pipeline does not keep in step; expected pipeline=1 or untied "
                         "embeddings")
    if pipeline > 1 and config.moe is not None and config.moe.capacity_scope == "step":
        raise ValueError(f"pipeline={pipeline} is not allowed with capacity_scope=\"step\": its "
                         "pre-pass plans the layers one after another over the whole batch, "
                         "which a pipeline's stages do not hold; expected pipeline=1, or "
                         "capacity_scope \"local\" or \"ranks\"")


def cut_into_stage(model: nn.Module, stage_layers: tuple[int, ...], stage: int) -> nn.Module:
    """Keep, in ``model`` itself, what stage ``stage`` runs: its layers, the embedding on the
    first stage, the final norm and output projection on the last."""
    check_pipeline_model(model.config, len(stage_layers))
    model.layers.keep(stage_bounds(stage_layers, stage))
    if stage > 0:
        model.embed_tokens = None
    if stage < len(stage_layers) - 1:
        model.norm, model.lm_head = None, None
    return model


class StageModule(nn.Module):
    """One stage as the schedule runs it: the first takes token ids, the others hidden
    states; the last returns logits, the others hidden states. ``mask`` (valid tokens) comes
    with every micro-batch to every stage.

    Hooks, set by whoever runs a step: ``after_layers(hidden, stats) -> hidden`` sees each
    forward's MoE statistics (and may attach a loss to the hidden states' backward);
    ``loss(logits, targets) -> loss`` is the last stage's loss of a micro-batch;
    ``context()`` wraps each forward (autocast, say)."""

    def __init__(self, model: nn.Module, stage: int, stages: int):
        super().__init__()
        self.model = model
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        self.after_layers = lambda hidden, stats: hidden
        self.loss = None
        self.context = contextlib.nullcontext
        self._schedules: dict = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.context():
            hidden = self.model.embed(x) if self.is_first else x
            hidden, stats = self.model.run_layers(hidden, mask)
            hidden = self.after_layers(hidden, stats)
            out = self.model.head(hidden) if self.is_last else hidden
        # Of a fixed type whatever autocast did, as the schedule was told (``_examples``).
        return out.to(self.output_dtype)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.model.layers[next(iter(self.model.layers.keys()))].attn_norm.weight.dtype

    @property
    def output_dtype(self) -> torch.dtype:
        """Hidden states travel in the weights' type; logits in at least float32 (the loss's)."""
        if self.is_last:
            return torch.promote_types(self.weight_dtype, torch.float32)
        return self.weight_dtype

    def examples(self, inputs: torch.Tensor, micro_batches: int):
        """Empty tensors of one micro-batch's input and output, as the schedule's metadata: told
        them, it runs no forward of its own to find them (which would route, measure and
        exchange as a real one does)."""
        rows, seq = inputs.shape[0] // micro_batches, inputs.shape[1]
        config, device = self.model.config, inputs.device
        # hidden states carry gradients back to the stage before
        hidden = torch.empty(rows, seq, config.hidden_size, dtype=self.weight_dtype,
                             device=device, requires_grad=True)
        given = torch.empty(rows, seq, dtype=inputs.dtype, device=device) if self.is_first \
            else hidden
        out = (torch.empty(rows, seq, config.vocab_size, dtype=self.output_dtype, device=device)
               if self.is_last else hidden)
        return given, out

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets)


def stage_module(model: nn.Module) -> StageModule | None:
    """The ``StageModule`` inside what ``parallelize`` returned (None without a pipeline)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, StageModule) else None


def run_schedule(model: nn.Module, mesh: Mesh, micro_batches: int, inputs: torch.Tensor,
                 targets: torch.Tensor, mask: torch.Tensor | None, train: bool) -> None:
    """One pass of this rank's rows through the pipeline, cut into ``micro_batches``: forward
    and backward (``train``), or forward only. ``model``: what ``parallelize`` returned (its
    data-parallel wrapper, which the schedule drives, included)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    stage = stage_module(model)
    key = (micro_batches, tuple(inputs.shape), mask is None, inputs.device)
    if key not in stage._schedules:
        given, out = stage.examples(inputs, micro_batches)
        pipeline_stage = PipelineStage(model, mesh.pipeline_rank, mesh.pipeline_size,
                                       inputs.device, input_args=given, output_args=out,
                                       group=mesh.pipeline_group)
        # 1F1B holds at most as many micro-batches' activations as there are stages; with
        # fewer micro-batches than stages it cannot start, and GPipe does the same work.
        kind = Schedule1F1B if micro_batches >= mesh.pipeline_size else ScheduleGPipe
        stage._schedules[key] = kind(pipeline_stage, micro_batches, loss_fn=stage.compute_loss,
                                     scale_grads=False)  # the loss is already the step's share
    schedule = stage._schedules[key]
    arguments = (inputs,) if stage.is_first else ()
    extra = {} if mask is None else {"mask": mask}
    what = f"the pipeline's exchange of stage {mesh.pipeline_rank}"
    with collective(what):
        if train:
            schedule.step(*arguments, target=targets, return_outputs=False, **extra)
        else:
            with torch.no_grad():
                schedule.eval(*arguments, target=targets, **extra)


def gather_stages(tensors: dict[str, torch.Tensor], mesh: Mesh) -> dict[str, torch.Tensor]:
    """``tensors`` of every stage (each named as in the whole model), merged on rank 0 from the
    first rank of each stage; the others get their own back. A collective."""
    if mesh.pipeline_size == 1:
        return tensors
    first = mesh.data_rank == 0 and mesh.tensor_rank == 0
    mine = {name: t.detach().cpu() for name, t in tensors.items()} if first else {}
    gathered = [None] * mesh.world_size if mesh.is_main else None
    with collective("the gathering of the stages' tensors"):
        dist.gather_object(mine, gathered, dst=0)
    if not mesh.is_main:
        return tensors
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged
