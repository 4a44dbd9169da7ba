"""convert's `budget=` and `calibration=`: ranks from a global budget, factors from a calibration.

nn does not know how calibration statistics are collected or how a budget is shared out by
measured sensitivity (that is `lowrank_ext.compress`, a layer above); it calls two methods of
the object passed as `calibration` (the protocol, duck-typed):

- `calibration.factorization(name, matrix)` → an object with
  `sigma`: the singular values (float64, descending) whose squares are the errors of dropping
  each component, the basis `energy=` is measured in, and
  `factors(rank)` → (U (out, r), s (r,), V (in, r)), float64, U and V with orthonormal columns,
  such that U diag(s) Vᵀ is the rank-r approximation of `matrix` (out, in) to store.
  It raises ValueError naming the layer when it has no statistics for it or they belong to
  another weight.
- `calibration.allocate(layers, budget, core)` → {name: rank, or None to keep the layer dense},
  with `layers` {name: (in_features, out_features, sigma)} and `budget` the number of factor
  entries (U, S, V summed over the layers) not to exceed. Optional: without it, or without
  calibration, the budget is shared uniformly (`uniform_ranks`).

Budget accounting: a rank-r factorization holds `factored_size(in, out, r, core)` numbers
(r·(in + out) + r for core="diag"), a dense layer in·out; biases are the same on both sides and
counted on neither. Only linear layers (nn.Linear, transformers' Conv1D) take part.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .hf_conv1d import conv1d_matrix, is_conv1d, linear_kinds
from .linear import LowRankLinear
from .truncation import _check_rank, check_size, chosen_by, energy_rank, factored_size

__all__ = ["CalibratedPlan", "budget_size", "linear_matrix", "uniform_rank", "uniform_ranks"]

_LOG = logging.getLogger("lowrank_ext")


def budget_size(budget, dense_total: int) -> int:
    """The budget as a number of factor entries: `budget`·dense_total for a float in (0, 1],
    `budget` itself for an int in [1, dense_total]. ValueError (naming 'budget') otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"argument 'budget' must be a float in (0, 1] or an int, got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(
                f"argument 'budget' must be a fraction in (0, 1] of the targeted weights' "
                f"{dense_total:,} numbers (or an int count), got {budget!r}"
            )
        return int(budget * dense_total)
    if not 1 <= budget <= dense_total:
        raise ValueError(
            f"argument 'budget' as a parameter count must be in [1, {dense_total:,}] (the "
            f"targeted weights hold {dense_total:,} numbers), got {budget:,}"
        )
    return budget


def uniform_rank(in_features: int, out_features: int, fraction: float, core: str = "diag") -> int:
    """The largest rank whose factorization holds at most `fraction` of in·out numbers (0 when
    even rank 1 holds more)."""
    limit = fraction * in_features * out_features
    rank = min(in_features, out_features)
    while rank and factored_size(in_features, out_features, rank, core) > limit:
        rank -= 1
    return rank


def uniform_ranks(
    shapes: Mapping[str, tuple[int, int]], budget: int, core: str
) -> dict[str, int | None]:
    """{name: rank} keeping the same fraction budget / Σ in·out of every layer's numbers; None
    (stay dense) for every layer when the budget pays for the dense model, since a dense layer
    is exact and a rank within the same numbers (at most the break-even rank) is not.

    `shapes` maps names to (in_features, out_features). Raises ValueError when that fraction
    leaves a layer below rank 1.
    """
    fraction = budget / sum(i * o for i, o in shapes.values())
    if fraction >= 1:
        return dict.fromkeys(shapes)
    ranks = {name: uniform_rank(i, o, fraction, core) for name, (i, o) in shapes.items()}
    starved = [name for name, rank in ranks.items() if rank == 0]
    if starved:
        raise ValueError(
            f"argument 'budget': {budget:,} numbers ({fraction:.2%} of each layer) leave no room "
            f"for rank 1 in {starved[:8]}"
        )
    return ranks


def linear_matrix(name: str, module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a linear layer (Conv1D: its transposed weight)."""
    if is_conv1d(module):
        return conv1d_matrix(module, f"target {name!r} ({type(module).__name__})")
    return module.weight


class CalibratedPlan:
    """What convert does with `budget`/`calibration`: the rank of every target, its factors.

    Built before any module is replaced, so every error (a target that is not linear, a budget
    out of range, statistics that do not fit) leaves the model as it was.
    """

    def __init__(self, targets, modules, rank, energy, rank_pattern, budget, calibration, core):
        if budget is not None and (rank is not None or energy is not None or rank_pattern):
            raise ValueError(
                "give either 'budget' or 'rank'/'energy'/'rank_pattern', not both: the budget "
                "chooses every layer's rank"
            )
        uses = "calibration" if budget is None else "budget"
        for name in targets:
            if not isinstance(modules[name], linear_kinds()):
                raise ValueError(
                    f"argument '{uses}' covers linear layers (nn.Linear, Conv1D), but target "
                    f"{name!r} is a {type(modules[name]).__name__}: exclude it "
                    "(exclude_modules) or convert it in a call of its own"
                )
        self.core = core
        self.matrices = {name: linear_matrix(name, modules[name]) for name in targets}
        self.sources = {}
        if calibration is not None:
            factorization = getattr(calibration, "factorization", None)
            if not callable(factorization):
                raise TypeError(
                    "argument 'calibration' must have a factorization(name, matrix) method "
                    f"(lowrank_ext.calibrate gives one), got {type(calibration).__name__}"
                )
            with torch.no_grad():
                self.sources = {name: factorization(name, m) for name, m in self.matrices.items()}
        self.ranks = None
        if budget is not None:
            self.ranks = self._allocate(budget, calibration)

    def _allocate(self, budget, calibration) -> dict[str, int | None]:
        shapes = {name: (m.shape[1], m.shape[0]) for name, m in self.matrices.items()}
        size = budget_size(budget, sum(i * o for i, o in shapes.values()))
        allocate = getattr(calibration, "allocate", None)
        if callable(allocate):
            layers = {n: (*shapes[n], source.sigma) for n, source in self.sources.items()}
            ranks = dict(allocate(layers, size, self.core))
        else:
            ranks = uniform_ranks(shapes, size, self.core)
        dense = [name for name, rank in ranks.items() if rank is None]
        if dense:
            _LOG.info("lowrank_ext.convert: budget=%r keeps dense: %s", budget, ", ".join(dense))
        return ranks

    def build(self, name, dense, rank, energy, allow_larger) -> LowRankLinear | None:
        """The low-rank replacement of target `name`, None when the budget keeps it dense.

        Raises LargerThanDenseError (convert keeps the module dense) as from_linear does.
        """
        matrix = self.matrices[name]
        out_features, in_features = matrix.shape
        how = chosen_by(rank, energy)
        if self.ranks is not None:
            rank, how = self.ranks[name], "chosen by the budget"
            if rank is None:
                return None
        source = self.sources.get(name)
        if energy is not None:  # only with calibration: a budget excludes energy
            rank = energy_rank(source.sigma, energy)
        elif rank is None:
            rank = min(in_features, out_features)
        _check_rank(rank, in_features, out_features)
        check_size(rank, in_features, out_features, self.core, allow_larger, how)
        if source is None:  # a budget without calibration: the plain truncated SVD
            if is_conv1d(dense):
                return LowRankLinear.from_conv1d(dense, rank, core=self.core, allow_larger=True)
            return LowRankLinear.from_linear(dense, rank, core=self.core, allow_larger=True)
        with torch.no_grad():
            U, s, V = source.factors(rank)
        module = LowRankLinear(
            in_features,
            out_features,
            rank,
            bias=dense.bias is not None,
            core=self.core,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        module._copy_svd(U, s, V, dense.bias)
        if is_conv1d(dense):
            module.dense_kind = "conv1d"
        return module
