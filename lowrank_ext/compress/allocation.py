"""Sharing a global parameter budget among layers by their measured end-to-end sensitivity.

Each layer i at rank r has a predicted output error e_i(r) = Σ_{j ≥ r} σ_ij² (σ of the whitened
SVD: the mean squared error of the layer's own output, whitening.py). Layers differ in how much
that error matters downstream, so the objective weights it by a sensitivity s_i measured end to
end (sensitivity.py: the model's relative output error per unit of e_i when layer i alone is
truncated) and minimizes the first-order estimate of the model's output error

    Σ_i s_i · e_i(r_i)   subject to   Σ_i size_i(r_i) ≤ budget,

with size_i the numbers in U, S, V (`lowrank_ext.nn.factored_size`) or in·out for a layer kept
dense. (Normalizing e_i by the layer's own ‖W X‖² or nothing, without s_i, was measured worse
than the uniform fraction on MiniLM; see issue 16.) Every layer's options are ranks 1 … its
break-even rank and dense; greedy steps along each layer's lower convex hull of (numbers, error),
the best gain per number first (SVD-LLM v2's idea of allocating from the truncation loss,
arXiv:2503.12340; the classic greedy of the multiple-choice knapsack), solve the problem's
linear relaxation, so the result is optimal for the numbers it spends unless a step that did
not fit was skipped. Every layer starts at rank 1.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch

from ..nn.calibrated import uniform_ranks
from ..nn.truncation import break_even_rank, factored_size

__all__ = ["allocate"]


def allocate(
    layers: Mapping[str, tuple],
    budget: int,
    core: str = "diag",
    sensitivity: Mapping[str, float] | None = None,
) -> dict[str, int | None]:
    """{name: rank, or None for dense} minimizing Σ s_i e_i(r_i) within `budget` numbers.

    Args:
        layers: {name: (in_features, out_features, sigma)}, sigma float64 descending.
        budget: the number of factor entries (U, S, V over all layers) not to exceed.
        core: "diag" or "full" (the sizes counted).
        sensitivity: {name: s_i ≥ 0}; None gives every layer the same fraction of its numbers
            (`lowrank_ext.nn.calibrated.uniform_ranks`).

    Raises ValueError when rank 1 everywhere already exceeds the budget, or a layer has no
    sensitivity.
    """
    shapes = {name: (i, o) for name, (i, o, _) in layers.items()}
    if sensitivity is None:
        return uniform_ranks(shapes, budget, core)
    missing = [name for name in layers if name not in sensitivity]
    if missing:
        raise ValueError(f"no measured sensitivity for layers {missing[:8]}")
    spent = sum(factored_size(i, o, 1, core) for i, o in shapes.values())
    if spent > budget:
        raise ValueError(
            f"argument 'budget': {budget:,} numbers do not hold rank 1 in every layer "
            f"({spent:,} needed)"
        )
    hulls = {
        name: _hull(_options(i, o, sigma, float(sensitivity[name]), core))
        for name, (i, o, sigma) in layers.items()
    }
    chosen = {name: 0 for name in layers}  # index into the layer's hull
    heap = [(_slope(hulls[name], 0), name) for name in layers if len(hulls[name]) > 1]
    heapq.heapify(heap)
    while heap:
        slope, name = heapq.heappop(heap)
        k = chosen[name]
        cost = hulls[name][k + 1][0] - hulls[name][k][0]
        if slope >= 0.0 or spent + cost > budget:
            continue  # no gain, or no room: this layer's later segments come after this one
        spent += cost
        chosen[name] = k + 1
        if k + 2 < len(hulls[name]):
            heapq.heappush(heap, (_slope(hulls[name], k + 1), name))
    # A hull segment that did not fit may jump over ranks that do: fill what is left with
    # single steps along the full option lists, the best gain per number first.
    options = {name: _options(*layers[name][:2], layers[name][2], s, core) for name, s in (
        (n, float(sensitivity[n])) for n in layers)}  # fmt: skip
    at = {name: options[name].index(hulls[name][k]) for name, k in chosen.items()}
    while True:
        best = None
        for name, k in at.items():
            for j in range(k + 1, len(options[name])):
                cost = options[name][j][0] - options[name][k][0]
                gain = options[name][k][1] - options[name][j][1]
                if spent + cost <= budget and gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, name, j, cost)
        if best is None:
            break
        _, name, j, cost = best
        spent += cost
        at[name] = j
    return {name: options[name][k][2] for name, k in at.items()}


def _options(in_features, out_features, sigma, weight, core) -> list[tuple[int, float, int | None]]:
    """(numbers, weighted error, rank or None for dense) of ranks 1 … break-even and dense."""
    power = sigma.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(power, [0]), 0), [0]).tolist() + [0.0]
    even = break_even_rank(in_features, out_features, core)
    options = [
        (factored_size(in_features, out_features, r, core), weight * tail[min(r, len(tail) - 1)], r)
        for r in range(1, max(even, 1) + 1)
    ]
    return options + [(in_features * out_features, 0.0, None)]


def _hull(options):
    """The lower convex hull of (numbers, error) from the cheapest option: the choices where
    each further number buys the most; the points between are never better in the relaxation."""
    hull = []
    for point in options:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _slope(hull, k) -> float:
    """Error change per number from hull point k to k + 1 (negative: a gain)."""
    return (hull[k + 1][1] - hull[k][1]) / (hull[k + 1][0] - hull[k][0])
