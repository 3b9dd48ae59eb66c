"""FasterMoE's smart schedule: the expert-parallel exchange split into one chunk per peer, in
ring order, so that the experts compute on the chunk that has arrived while the next one
travels.

Legend: D model dim, R ranks of the expert group, L local experts, N rows this rank sends
(grouped by destination rank, then expert), M rows it receives.

At ring step s (0..R-1) rank q sends its rows for rank q + s and receives those of rank q - s
(mod R); step 0 is its own rows, which need no exchange. Every exchange is a pair of
asynchronous point-to-point messages (``isend``/``irecv``), started one step ahead: while the
experts compute on step s's chunk, step s + 1's chunk and step s - 1's outputs are in flight.
The backward runs the same ring with the gradients: each chunk's gradient travels to the
rank that computed it, which backpropagates through that chunk alone (its graph, kept from
the forward) while the next chunk's gradient travels.

Each row meets the same expert weights as in one exchange, so outputs and gradients equal the
unsplit exchange's up to the grouped matmul's blocking (float64: within 1e-12, tested). With
NCCL the messages run on NCCL's own CUDA stream, so a chunk's compute on the current stream
overlaps the next chunk's transfer without a stream of ours (``wait`` orders the current
stream after the message); with gloo the overlap is its transport threads against the
compute thread (docs/parallel.md says where it pays).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.parallel.mesh import collective

# Message tags: a pair of ranks exchanges at most one message of each kind per ring step.
_ROWS, _RESULTS = 1, 2


def ring_exchange(chunks_out: list[torch.Tensor], receive: list[int],
                  compute: Callable[[int, torch.Tensor], torch.Tensor], group, rank: int,
                  size: int, what: str) -> list[torch.Tensor]:
    """``chunks_out[r]`` goes to rank r, which returns ``compute(source, chunk)`` for it (as
    many rows as it got); ``receive[r]`` rows arrive from rank r. Returns, for each rank r,
    what r computed on ``chunks_out[r]``. Step s + 1's chunk is on its way while step s's is
    computed."""
    peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(size)]
    width = chunks_out[rank].shape[1]
    template = chunks_out[rank]

    def start(step: int):
        to, source = (rank + step) % size, (rank - step) % size
        arrived = template.new_empty(receive[source], width)
        requests = _exchange(chunks_out[to], peers[to], arrived, peers[source], group, _ROWS)
        return source, arrived, requests

    results: list[torch.Tensor | None] = [None] * size
    pending = start(1) if size > 1 else None
    results[rank] = compute(rank, chunks_out[rank])
    in_flight = []
    with collective(what):
        for step in range(1, size):
            source, arrived, requests = pending
            _wait(requests)
            if step + 1 < size:
                pending = start(step + 1)
            computed = compute(source, arrived)
            to = (rank + step) % size
            results[to] = template.new_empty(len(chunks_out[to]), computed.shape[1])
            in_flight += _exchange(computed, peers[source], results[to], peers[to], group,
                                   _RESULTS)
        _wait(in_flight)
    return results


def _exchange(send: torch.Tensor, to: int, receive_into: torch.Tensor, source: int, group,
              tag: int) -> list:
    """Start sending ``send`` to global rank ``to`` and receiving ``receive_into`` from
    ``source``; an empty message is not sent (both sides know its size)."""
    requests = []
    if len(send):
        requests.append(dist.isend(send.contiguous(), to, group=group, tag=tag))
    if len(receive_into):
        requests.append(dist.irecv(receive_into, source, group=group, tag=tag))
    return requests


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class _SmartExperts(torch.autograd.Function):
    """rows_ND (grouped by destination rank, then expert) -> the experts' outputs for them,
    in the same order, computed chunk by chunk in ring order. The expert parameters are inputs,
    so that their gradients come back through this function as any input's."""

    @staticmethod
    def forward(ctx, rows_ND, send_RL, receive_RL, experts, schedule, track, *parameters):
        group, rank, size, what = schedule
        send, receive = send_RL.sum(1).tolist(), receive_RL.sum(1).tolist()
        graphs = {}

        def run_experts(source: int, chunk_MD: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                chunk_MD = chunk_MD.detach().requires_grad_(track)
                out_MD = experts(chunk_MD, receive_RL[source])
            if track:
                graphs[source] = (chunk_MD, out_MD)
            return out_MD.detach()

        outputs = ring_exchange(list(rows_ND.split(send)), receive, run_experts, group, rank,
                                size, what)
        ctx.graphs, ctx.send, ctx.receive, ctx.schedule = graphs, send, receive, schedule
        ctx.parameters = parameters
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_ND):
        group, rank, size, what = ctx.schedule
        parameters = ctx.parameters
        parameter_grads = [None] * len(parameters)

        def backpropagate(source: int, grad_MD: torch.Tensor) -> torch.Tensor:
            chunk_MD, out_MD = ctx.graphs.pop(source)
            grads = torch.autograd.grad(out_MD, (chunk_MD, *parameters), grad_MD,
                                        allow_unused=True)
            for index, grad in enumerate(grads[1:]):
                if grad is not None:
                    total = parameter_grads[index]
                    parameter_grads[index] = grad if total is None else total + grad
            return grads[0]

        grads = ring_exchange(list(grad_ND.contiguous().split(ctx.send)), ctx.receive,
                              backpropagate, group, rank, size, f"{what}, backward")
        return (torch.cat(grads), None, None, None, None, None, *parameter_grads)


def smart_experts(rows_ND: torch.Tensor, send_RL: torch.Tensor, receive_RL: torch.Tensor,
                  experts: nn.Module, group, rank: int, size: int,
                  what: str = "smart-schedule exchange") -> torch.Tensor:
    """The outputs of the experts of their ranks for ``rows_ND`` (``send_RL[r, l]`` rows for
    local expert l of rank r, in that order; ``receive_RL[r, l]`` rows arrive from rank r for
    this rank's expert l), exchanged and computed in ring order."""
    parameters = [p for p in experts.parameters() if p.requires_grad]
    track = torch.is_grad_enabled() and (rows_ND.requires_grad or bool(parameters))
    return _SmartExperts.apply(rows_ND, send_RL, receive_RL, experts,
                               (group, rank, size, what), track, *parameters)
