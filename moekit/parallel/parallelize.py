"""Applying a layout to a plain model from outside: the model never asks for ranks."""
from __future__ import annotations

import torch.nn as nn

from moekit.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: Mesh) -> nn.Module:
    """The model as ``mesh`` runs it: itself on one process; under data parallelism a
    ``DistributedDataParallel`` wrapper, whose gradient all-reduce runs in buckets overlapped
    with the backward. Buffers are not broadcast: the router state in them moves identically
    on every rank (``MoELayer.update_router_state``)."""
    if mesh.data_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, process_group=mesh.data_group,
                                   broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside whatever ``parallelize`` wrapped it in."""
    return getattr(model, "module", model)
