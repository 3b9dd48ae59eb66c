"""Applying a layout to a plain model from outside: the model never asks for ranks."""
from __future__ import annotations

import inspect

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
    # torch 2.13 renamed the option; older versions know only the first name.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, process_group=mesh.data_group, **no_buffer_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside whatever ``parallelize`` wrapped it in."""
    return getattr(model, "module", model)
