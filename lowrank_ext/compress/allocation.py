"""Sharing a global parameter budget among layers by their measured end-to-end sensitivity.

Each layer i at rank r has a predicted output error e_i(r) = Σ_{j ≥ r} σ_ij² (σ of the whitened
SVD: the mean squared error of the layer's own output, whitening.py). Layers differ in how much
that error matters downstream, so the objective weights it by a sensitivity s_i measured end to
end (sensitivity.py: the model's relative output error per unit of e_i when layer i alone is
truncated) and minimizes the first-order estimate of the model's output error

    Σ_i s_i · e_i(r_i)   subject to   Σ_i size_i(r_i) ≤ budget,

with size_i the numbers in U, S, V (`lowrank_ext.nn.factored_size`) or in·out for a layer kept
dense. (Normalizing e_i by the layer's own ‖W X‖² or nothing, without s_i, was measured worse
than the uniform fraction on MiniLM; see issue 16.) σ² decreases with j, so each layer's error
is convex in its rank and greedy steps by gain per parameter (SVD-LLM v2's idea of allocating
from the truncation loss, arXiv:2503.12340) reach the optimum up to the last step that does not
fit. Every layer starts at rank 1; the step past the break-even rank keeps it dense.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

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
    ranks: dict[str, int | None] = dict.fromkeys(layers, 1)
    spent = sum(factored_size(i, o, 1, core) for i, o in shapes.values())
    if spent > budget:
        raise ValueError(
            f"argument 'budget': {budget:,} numbers do not hold rank 1 in every layer "
            f"({spent:,} needed)"
        )
    power = {name: sigma.double() ** 2 for name, (_, _, sigma) in layers.items()}

    def next_step(name):
        """(-gain per number, cost) of raising layer `name` one rank, or of making it dense."""
        rank, (i, o) = ranks[name], shapes[name]
        weight = float(sensitivity[name])
        if rank < break_even_rank(i, o, core):
            cost = factored_size(i, o, rank + 1, core) - factored_size(i, o, rank, core)
            gain = weight * float(power[name][rank]) if rank < power[name].numel() else 0.0
        else:
            cost = i * o - factored_size(i, o, rank, core)
            gain = weight * float(power[name][rank:].sum())
        return -gain / max(cost, 1), cost

    heap = []
    for name in layers:
        ratio, cost = next_step(name)
        heapq.heappush(heap, (ratio, name, cost))
    while heap:
        ratio, name, cost = heapq.heappop(heap)
        if ratio >= 0.0:  # nothing left to gain anywhere
            break
        if spent + cost > budget:
            continue  # this layer's later steps cost at least as much
        spent += cost
        rank = ranks[name]
        if rank >= break_even_rank(*shapes[name], core):
            ranks[name] = None
            continue
        ranks[name] = rank + 1
        ratio, cost = next_step(name)
        heapq.heappush(heap, (ratio, name, cost))
    return ranks
