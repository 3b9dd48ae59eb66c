"""Who this process is in a run: its pipeline stage, and its place among the ranks that split
the batch.

A run of W ranks (torchrun's WORLD_SIZE processes, gloo on CPU, NCCL on CUDA) is a
``DeviceMesh`` of dimensions (``pp``, ``dp``, ``ep``), ``pp`` outermost: the W / P ranks of a
pipeline stage are consecutive, and each of them takes the contiguous block of the global
batch's rows given by its data rank (``rows``), so that a batch cut into ranks is cut as it
would be into micro-batches. Inside a stage, ``ep`` groups of consecutive ranks share each MoE
layer's experts. A run of one process has a mesh of one and issues no collective: the
single-process path needs no process group at all.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.config import ExpertParallelConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveError(RuntimeError):
    """A collective that failed because another rank raised, died or stalled past the
    collective timeout; the message names this rank and the operation, in one line."""


@contextlib.contextmanager
def collective(what: str):
    """Name the operation in the error if a collective inside fails (the innermost name
    wins: an all-to-all of layer 3 inside a backward is reported as itself)."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:  # gloo and NCCL report a dead or late peer as these
        if not dist.is_initialized():
            raise
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")
        raise CollectiveError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} "
                              f"failed, another rank failed or stalled ({first_line[:160]})"
                              ) from error


@dataclass
class Mesh:
    """The ranks of a run. Every rank of a pipeline stage takes its own rows of the batch
    (``data_rank`` of ``data_size``: all ranks of the stage, data parallelism being over
    everything that is replicated); under expert parallelism each MoE layer's experts are also
    spread over the ``expert_size`` ranks of an ``ep`` group, and the ranks of a ``dp`` group
    hold the same experts. Under pipeline parallelism (``pipeline_size`` stages, layers per
    stage ``stage_layers``) this rank holds stage ``pipeline_rank``'s layers.
    ``device_mesh`` (dims ``pp``, ``dp``, ``ep``) is None on one process."""

    data_rank: int = 0
    data_size: int = 1
    expert_rank: int = 0
    expert_size: int = 1
    device_mesh: object | None = None
    zero: int = 0  # 1: the optimizer state sharded over the data-parallel ranks (ZeRO-1)
    pipeline_rank: int = 0
    pipeline_size: int = 1
    stage_layers: tuple[int, ...] | None = None
    stage_group: object | None = None  # the ranks of this stage (every rank without a pipeline)
    tensor_size: int = 1  # EDP: the ep group's ranks hold the same rows (tensor = expert)
    rank: int = 0  # among all of the run's ranks

    @property
    def world_size(self) -> int:
        return self.data_size * self.pipeline_size * self.tensor_size

    @property
    def tensor_rank(self) -> int:
        """This rank's place in its expert-data-parallel group (0 without one)."""
        return self.expert_rank if self.tensor_size > 1 else 0

    @property
    def tensor_mesh(self):
        """The 1-D device mesh of this rank's expert-data-parallel group."""
        return self.device_mesh["ep"]
    # How the expert-parallel exchange runs (FasterMoE's overlap and shadowing).
    expert_options: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)

    @property
    def is_main(self) -> bool:
        """The rank that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this rank's collectives take their tensors (gloo: the CPU)."""
        if self.device_mesh is None:
            return torch.device("cpu")
        return torch.device(self.device_mesh.device_type)

    @property
    def data_group(self):
        """The ranks of this stage (every rank without a pipeline): the group over which the
        batch is split and replicas are averaged."""
        if self.device_mesh is None:
            return None
        if self.tensor_size > 1:
            return self.device_mesh.get_group("dp")
        return self.stage_group if self.pipeline_size > 1 else dist.group.WORLD

    @property
    def pipeline_group(self):
        """The ranks that hold the stages of the same rows, one each."""
        return None if self.device_mesh is None else self.device_mesh.get_group("pp")

    @property
    def expert_group(self):
        """The ranks among which one MoE layer's experts are spread."""
        return None if self.device_mesh is None else self.device_mesh.get_group("ep")

    @property
    def expert_replicas(self) -> int:
        """How many ranks hold the same experts: under EDP the ``dp`` group's, else the stage's
        ranks over the expert groups."""
        return self.data_size // (1 if self.tensor_size > 1 else self.expert_size)

    @property
    def expert_replica_group(self):
        """The ranks that hold the same experts (and sum those experts' gradients)."""
        return None if self.device_mesh is None else self.device_mesh.get_group("dp")

    @functools.cached_property
    def expert_shard_mesh(self):
        """This stage's ranks as a 2-D device mesh (``ep``, ``dp``): ZeRO-2/3 shard each rank's
        experts over its ``dp`` dimension (their replicas), so a shard's place in a layer's
        whole [E, ...] tensor is its expert group's block, then its replica's part of that
        block: ``Shard(0)`` on both dimensions, in this order (the ``device_mesh`` has them the
        other way). Made on first use, a collective: every rank asks for it."""
        from torch.distributed.device_mesh import DeviceMesh
        ranks = torch.arange(self.world_size).view(self.pipeline_size, -1, self.expert_size)
        return DeviceMesh(self.device.type, ranks.transpose(1, 2),
                          mesh_dim_names=("pp", "ep", "dp"))["ep", "dp"]

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of a global batch of ``batch_size`` rows."""
        per_rank = batch_size // self.data_size
        return slice(self.data_rank * per_rank, (self.data_rank + 1) * per_rank)

    def shared_batches(self, count: int) -> list[tuple[int, bool]]:
        """The batches this rank evaluates of ``count`` that the data-parallel ranks share,
        each as (index, counted). Under expert parallelism (and ZeRO-2/3's gathers) every rank
        of a group takes part in each forward's exchanges, so all ranks run as many forwards:
        one past the end repeats the last batch without counting it."""
        rounds = -(-count // self.data_size)
        every_rank_runs = self.expert_size > 1 or self.zero >= 2
        return [(min(index, count - 1), index < count)
                for index in range(self.data_rank, rounds * self.data_size, self.data_size)
                if index < count or every_rank_runs]

    def close(self) -> None:
        """End this process's part in the group (nothing on one process)."""
        if self.device_mesh is not None:
            dist.destroy_process_group()

    def sum_(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """Sum ``tensor`` in place over ``group`` (default: this stage's ranks); returns it."""
        if self.data_size > 1:
            dist.all_reduce(tensor, group=group if group is not None else self.data_group)
        return tensor

    def sum_all_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over every rank of the run; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


def check_pipeline_degree(pipeline: int, world: int) -> None:
    if pipeline < 1 or world % pipeline:
        raise ValueError(f"pipeline={pipeline} is not allowed on {world} processes: it must be "
                         "a divisor of the number of processes")


def check_tensor_degree(tensor: int, expert: int) -> None:
    if tensor > 1 and tensor != expert:
        raise ValueError(f"tensor={tensor} is not allowed with expert={expert}: moekit trains "
                         "tensor parallelism as Skywork-MoE's expert data parallelism, "
                         f"--tensor t --expert t (expected expert={tensor})")


def check_expert_degree(expert: int, world: int) -> None:
    if expert < 1 or world % expert:
        raise ValueError(f"expert={expert} is not allowed on {world} processes: it must be a "
                         "divisor of the number of processes")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def torchrun_world_size() -> int:
    """The processes torchrun started (1 for a plain process)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not allowed: expected "
                         "a number of processes, as torchrun sets it") from None


def world_mesh(device_type: str = "cpu", expert: int = 1, pipeline: int = 1,
               stage_layers: tuple[int, ...] | None = None, tensor: int = 1) -> Mesh:
    """The processes of the initialised default group: ``pipeline`` stages of consecutive
    ranks (``stage_layers`` layers each, as ``moekit.plan.Layout.stages`` checked them), each
    rank its own rows of the batch, experts spread over groups of ``expert`` consecutive
    ranks; with ``tensor`` = ``expert`` > 1 (EDP) such a group shares its rows instead."""
    world = dist.get_world_size()
    if world == 1:
        return Mesh()
    check_pipeline_degree(pipeline, world)
    stage = world // pipeline
    check_expert_degree(expert, stage)
    check_tensor_degree(tensor, expert)
    from torch.distributed.device_mesh import init_device_mesh
    device_mesh = init_device_mesh(device_type, (pipeline, stage // expert, expert),
                                   mesh_dim_names=("pp", "dp", "ep"))
    stage_group = None
    if pipeline > 1:  # every rank makes every stage's group, in the same order
        stage_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(s * stage, (s + 1) * stage)) for s in range(pipeline)])
    data_rank, data_size = ((device_mesh.get_local_rank("dp"), stage // expert) if tensor > 1
                            else (dist.get_rank() % stage, stage))
    return Mesh(data_rank=data_rank, data_size=data_size,
                expert_rank=device_mesh.get_local_rank("ep"), expert_size=expert,
                device_mesh=device_mesh, pipeline_rank=dist.get_rank() // stage,
                pipeline_size=pipeline, stage_layers=stage_layers, stage_group=stage_group,
                tensor_size=tensor, rank=dist.get_rank())


def mesh_from_environment(device: torch.device, collective_timeout: float = 600.0,
                          expert: int = 1, pipeline: int = 1,
                          stage_layers: tuple[int, ...] | None = None, tensor: int = 1) -> Mesh:
    """The mesh of a process started by torchrun (its environment variables), with the process
    group made (gloo on CPU, NCCL on CUDA); a plain process gets a mesh of one. A collective
    that waits longer than ``collective_timeout`` seconds for another rank fails. ``expert``:
    the ranks over which each MoE layer's experts are spread; ``pipeline``: the stages, of
    ``stage_layers`` layers each."""
    if not launched_by_torchrun():
        return Mesh()
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"the torchrun environment lacks {', '.join(missing)}: start with "
                         "torchrun --nproc-per-node N -m moekit ..., or moekit ... --nproc N")
    check_pipeline_degree(pipeline, torchrun_world_size())
    check_expert_degree(expert, torchrun_world_size() // pipeline)
    check_tensor_degree(tensor, expert)
    if torchrun_world_size() == 1:
        return Mesh()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one rank per GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=collective_timeout))
    return world_mesh(device.type, expert, pipeline, stage_layers, tensor)
