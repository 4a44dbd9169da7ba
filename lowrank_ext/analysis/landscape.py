"""Loss landscapes around trained weights along filter-normalized random directions.

Li, Xu, Taylor, Studer and Goldstein, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018): a random direction d is drawn for every trainable tensor and each of its filters is scaled
to the norm of the weight's filter, so landscapes of differently scaled networks compare. A filter
is a row (one output unit) of a dense weight; for a factor U or V of a LowRankLinear or
LowRankConv2d it is a column (one singular vector, the unit the layer trains). 1-D tensors
(biases, scales) are left out by default, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import LowRankConv2d, LowRankLinear

__all__ = ["Landscape", "filter_normalized_direction", "loss_landscape"]


@dataclass
class Landscape:
    """Losses on a grid around the trained parameters θ.

    coordinates: (steps,) offsets c along each direction, in units of the filter-normalized
    direction (±1 moves every filter by its own norm). losses: (steps,) for one direction, or
    (steps, steps) with losses[i, j] = loss(θ + c[i] d₁ + c[j] d₂). directions: the d's used,
    by parameter name.
    """

    coordinates: torch.Tensor
    losses: torch.Tensor
    center_loss: float
    directions: list[dict[str, torch.Tensor]]


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _column_filtered(model: nn.Module) -> set[str]:
    """Names of the low-rank factors, whose filters are columns."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, (LowRankLinear, LowRankConv2d)):
            prefix = f"{module_name}." if module_name else ""
            names.update({prefix + "U", prefix + "V"})
    return names


def filter_normalized_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    include_1d: bool = False,
) -> dict[str, torch.Tensor]:
    """A random direction over the model's trainable tensors, filter by filter as long as the
    weights' filters (zero for 1-D tensors unless `include_1d`, which scales each as a whole)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    columns = _column_filtered(model)
    direction = {}
    for name, p in _trainable(model).items():
        weight = p.detach().double()
        d = torch.randn(p.shape, dtype=torch.float64, generator=generator).to(weight.device)
        if p.dim() <= 1:
            if include_1d:
                d *= torch.linalg.vector_norm(weight) / torch.linalg.vector_norm(d)
            else:
                d.zero_()
        else:
            # Norm over everything but the filter dimension.
            filter_dim = 1 if name in columns else 0
            dims = [i for i in range(p.dim()) if i != filter_dim]
            d *= torch.linalg.vector_norm(
                weight, dim=dims, keepdim=True
            ) / torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        direction[name] = d.to(p.dtype)
    return direction


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float | torch.Tensor],
    directions: int = 2,
    steps: int = 21,
    span: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    include_1d: bool = False,
) -> Landscape:
    """Evaluate `loss_fn(model)` on a line (directions=1) or plane (directions=2) through the
    current trained parameters, along filter-normalized random directions.

    Args:
        model: perturbed in place during the scan; every parameter is restored bit for bit
            afterwards (also on error). Its train/eval mode is left to `loss_fn`.
        loss_fn: returns the loss of the model as it is (called under torch.no_grad()).
        directions: 1 or 2.
        steps: grid points per direction (≥ 2; odd puts θ itself on the grid).
        span: the grid covers offsets [-span, span].
        generator: random source for the directions.
        include_1d: also perturb biases and scales (see `filter_normalized_direction`).
    """
    if directions not in (1, 2) or isinstance(directions, bool):
        raise ValueError(f"argument 'directions' must be 1 or 2, got {directions!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"argument 'steps' must be an int ≥ 2, got {steps!r}")
    if isinstance(span, bool) or not isinstance(span, (int, float)) or not span > 0:
        raise ValueError(f"argument 'span' must be a positive number, got {span!r}")
    if not callable(loss_fn):
        raise TypeError(f"argument 'loss_fn' must be callable, got {type(loss_fn).__name__}")
    params = _trainable(model)
    if not params:
        raise ValueError("argument 'model' has no trainable parameter to move along")
    ds = [
        filter_normalized_direction(model, generator=generator, include_1d=include_1d)
        for _ in range(directions)
    ]
    coordinates = torch.linspace(-span, span, steps, dtype=torch.float64)
    grid = (
        torch.cartesian_prod(coordinates, coordinates) if directions == 2 else coordinates[:, None]
    )
    saved = {name: p.detach().clone() for name, p in params.items()}
    losses = torch.empty(len(grid), dtype=torch.float64)
    with torch.no_grad():
        center_loss = float(loss_fn(model))
        try:
            for index, offsets in enumerate(grid.tolist()):
                for name, p in params.items():
                    p.copy_(saved[name])
                    for offset, d in zip(offsets, ds):
                        p.add_(d[name], alpha=offset)
                losses[index] = float(loss_fn(model))
        finally:
            for name, p in params.items():
                p.copy_(saved[name])
    shape = (steps, steps) if directions == 2 else (steps,)
    return Landscape(coordinates, losses.reshape(shape), center_loss, ds)
