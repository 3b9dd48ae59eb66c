"""Balanced token-to-expert assignment: the exact solver of BASE layers, and Sinkhorn's estimate.

Legend: T tokens, E experts; scores_TE[t, e] is token t's affinity to expert e (larger is better).

``balanced_assignment`` gives every token one expert so that the summed affinity is as large as
possible while every expert takes an equal share: floor(T / E) tokens each, and when E does not
divide T, the T mod E experts that the optimum prefers take one more (the loads then differ by
at most one). It is exact: successive shortest augmenting paths (the Hungarian method's), one
token at a time, over a residual graph whose nodes are the E experts rather than the T * E
slots, since all slots of one expert are alike. Moving a token u from expert a to b costs
s_ua - s_ub, so a path a -> b uses the cheapest such token; one extra node X stands for the
T mod E "one more" slots (a -> X: a takes its extra token, X -> a: a gives it back). Each path is
found by Bellman-Ford over E + 1 nodes: the graph has no negative cycle, because the partial
assignment stays optimal for the tokens placed so far. Tokens whose best expert still has room
are placed first, all at once: while every placed token sits at its best expert no move has a
negative cost, so the direct edge is the shortest path.

It runs on the host (a sequential algorithm, as fairseq's C++ one): the scores are read back
once per call.

``sinkhorn`` is Megatron-LM's Sinkhorn-Knopp balancing (S-BASE): it scales exp(scores) so that
every token's row sums to 1/T and every expert's column to 1/E; the top K of the scaled matrix
approximate the balanced assignment without solving it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SINKHORN_EPS = 1e-8  # Megatron's guard against a zero row or column sum
SINKHORN_MAX_ITERATIONS = 1000  # a tolerance of 0 would never stop otherwise


def balanced_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """The expert of each token (int64 [T], on the scores' device) maximising the summed score
    with floor(T / E) or ceil(T / E) tokens per expert, exactly T mod E experts taking the
    larger share."""
    solver = _BalancedSolver(scores_TE.detach().to("cpu", torch.float64).numpy())
    solver.place_best_first()
    for token in np.flatnonzero(solver.owner < 0):
        solver.place_by_shortest_path(token)
    return torch.from_numpy(solver.owner).to(scores_TE.device)


class _BalancedSolver:
    """The state of one balanced assignment: who holds each token, and the cheapest move from
    every expert to every other. NumPy, not torch: thousands of operations on a few dozen
    numbers each, where torch's per-call cost would dominate."""

    def __init__(self, scores_TE: np.ndarray):
        self.scores_TE = scores_TE
        num_tokens, num_experts = scores_TE.shape
        self.num_experts = num_experts
        self.share, self.extras = divmod(num_tokens, num_experts)  # floor(T/E), T mod E
        self.owner = np.full(num_tokens, -1, dtype=np.int64)
        self.load_E = np.zeros(num_experts, dtype=np.int64)
        # Edge costs between nodes 0..E-1 (experts) and E (the extra slots), inf where none.
        self.move_cost = np.full((num_experts + 1, num_experts + 1), math.inf)
        self.move_token = np.zeros((num_experts, num_experts), dtype=np.int64)

    def place_best_first(self) -> None:
        """Every token whose best expert has room, in token order: the first ``share`` of each
        expert, then the first tokens that bring an expert to share + 1, while extras last."""
        best_T = self.scores_TE.argmax(-1)
        order_T = np.argsort(best_T, kind="stable")
        counts_E = np.bincount(best_T, minlength=self.num_experts)
        position_T = np.empty_like(best_T)
        position_T[order_T] = np.arange(len(best_T)) - (counts_E.cumsum() - counts_E)[
            best_T[order_T]]
        placed_T = position_T < self.share
        placed_T[np.flatnonzero(position_T == self.share)[:self.extras]] = True
        self.owner[placed_T] = best_T[placed_T]
        self.load_E = np.bincount(self.owner[placed_T], minlength=self.num_experts)
        for expert in range(self.num_experts):
            self._update_moves(expert)

    def _update_moves(self, expert: int) -> None:
        """The cheapest token to move out of ``expert`` towards each other expert."""
        tokens = np.flatnonzero(self.owner == expert)
        if len(tokens) == 0:
            self.move_cost[expert, :self.num_experts] = math.inf
            return
        rows_UE = self.scores_TE[tokens]
        cost_UE = rows_UE[:, expert:expert + 1] - rows_UE
        index_E = cost_UE.argmin(0)
        cost_E = cost_UE[index_E, np.arange(self.num_experts)]
        cost_E[expert] = math.inf
        self.move_cost[expert, :self.num_experts] = cost_E
        self.move_token[expert] = tokens[index_E]

    def _edges(self) -> np.ndarray:
        """The residual graph's edge costs now: moves, and the edges to and from X."""
        cost = self.move_cost.copy()
        x = self.num_experts
        if self.extras:
            cost[:x, x] = np.where(self.load_E == self.share, 0.0, math.inf)
            cost[x, :x] = np.where(self.load_E == self.share + 1, 0.0, math.inf)
        return cost

    def place_by_shortest_path(self, token: int) -> None:
        num_nodes = self.num_experts + 1
        x = self.num_experts
        cost = self._edges()
        dist = np.append(-self.scores_TE[token], math.inf)
        parent = np.full(num_nodes, -1)  # -1: reached from the token directly
        nodes = np.arange(num_nodes)
        for _ in range(num_nodes):
            through_NN = dist[:, None] + cost
            via = through_NN.argmin(0)
            best = through_NN[via, nodes]
            better = best < dist
            if not better.any():
                break
            dist = np.where(better, best, dist)
            parent = np.where(better, via, parent)
        # Where the path may end: an expert under its share, or X while extras remain.
        room = np.append(self.load_E < self.share,
                         (self.load_E > self.share).sum() < self.extras)
        path = [int(np.where(room, dist, math.inf).argmin())]
        while parent[path[-1]] >= 0:
            path.append(int(parent[path[-1]]))
            if len(path) > num_nodes:  # a cycle: impossible without negative cycles
                raise RuntimeError("balanced_assignment found no simple path (a bug)")
        path.reverse()
        self.owner[token] = path[0]
        for a, b in zip(path, path[1:]):
            if a != x and b != x:
                self.owner[self.move_token[a, b]] = b
        self.load_E = np.bincount(self.owner[self.owner >= 0], minlength=self.num_experts)
        for expert in set(path) - {x}:
            self._update_moves(expert)


def sinkhorn(scores_TE: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Megatron-LM's ``sinkhorn``: diag(d0) exp(scores) diag(d1) with rows scaled to 1/T and
    columns to 1/E in turn, until the mean change of d1 is at most ``tolerance`` (at most
    SINKHORN_MAX_ITERATIONS rounds). exp is taken after subtracting each row's largest score, which
    changes nothing but the overflow (the row scalings absorb it)."""
    cost_TE = torch.exp(scores_TE - scores_TE.max(-1, keepdim=True).values)
    num_tokens, num_experts = cost_TE.shape
    d0_T = cost_TE.new_ones(num_tokens)
    d1_E = cost_TE.new_ones(num_experts)
    for _ in range(SINKHORN_MAX_ITERATIONS):
        d0_T = 1 / (num_tokens * ((d1_E * cost_TE).sum(1) + SINKHORN_EPS))
        d1_new_E = 1 / (num_experts * ((d0_T[:, None] * cost_TE).sum(0) + SINKHORN_EPS))
        change = float((d1_new_E - d1_E).abs().mean())
        d1_E = d1_new_E
        if change <= tolerance:
            break
    return d1_E * cost_TE * d0_T[:, None]
