"""Figures for successive refinement: the loss curve with its rank updates, the per-group
gradient and parameter norms against rank, and loss landscapes.

Needs matplotlib (`pip install lowrank_ext[plot]`), imported only when a figure is drawn. Figures
are built as `matplotlib.figure.Figure` objects rendered by Agg, without pyplot, so they neither
need a display nor touch the caller's pyplot state. Every function returns the figure and saves it
if given a path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..analysis.landscape import Landscape
from ..training.successive import SuccessiveHistory
from ._canvas import finish, new_figure

__all__ = ["plot_group_norms", "plot_landscapes", "plot_loss_curve"]

# Parameter groups of one low-rank layer, in the order they are drawn.
_GROUPS = ("U", "V", "S", "bias", "U_frozen", "V_frozen", "S_frozen")
_RANK_UPDATE_COLOR = "tab:orange"


def _check_history(history) -> None:
    if not isinstance(history, SuccessiveHistory):
        raise TypeError(
            f"argument 'history' must be a SuccessiveHistory, got {type(history).__name__}"
        )
    if not history.epochs:
        raise ValueError("argument 'history' holds no epochs to plot")


def plot_loss_curve(
    history: SuccessiveHistory, path: str | Path | None = None, *, title=None, dpi: int = 100
):
    """Training and validation loss per epoch (log scale), a vertical line at each rank update."""
    _check_history(history)
    figure = new_figure(figsize=(7, 4))
    ax = figure.add_subplot()
    epochs = [record.epoch for record in history.epochs]
    ax.plot(epochs, [r.train_loss for r in history.epochs], label="train", color="tab:blue")
    ax.plot(epochs, [r.val_loss for r in history.epochs], label="validation", color="tab:green")
    for index, epoch in enumerate(history.growth_epochs):
        ax.axvline(
            epoch,
            color=_RANK_UPDATE_COLOR,
            linewidth=0.6,
            alpha=0.6,
            label="rank update" if index == 0 else None,
        )
    if history.noise_rank is not None:
        noise = next(r for r in history.ranks if r.rank == history.noise_rank)
        ax.axvline(
            noise.first_epoch + noise.epochs,
            color="tab:red",
            linestyle="--",
            label=f"noise rank {history.noise_rank}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title or "Successive refinement: loss, rank +1 at each orange line")
    ax.legend()
    return finish(figure, path, dpi)


def _layers_of(history: SuccessiveHistory) -> list[str]:
    return list(history.ranks[0].layer_ranks) if history.ranks else []


def _key(layer: str, group: str) -> str:
    return f"{layer}.{group}" if layer else group


def plot_group_norms(history: SuccessiveHistory, path: str | Path | None = None, *, dpi: int = 100):
    """Per low-rank layer (columns): mean gradient norm (top) and parameter norm (bottom) of each
    parameter group against rank. A group missing at a rank (frozen, or the layer at full rank)
    leaves a gap: the poster's dropping-out parameter groups."""
    _check_history(history)
    layers = _layers_of(history)
    if not layers:
        raise ValueError("argument 'history' holds no finished rank to plot")
    figure = new_figure(figsize=(3.6 * len(layers), 5.6))
    ranks = [record.rank for record in history.ranks]
    for column, layer in enumerate(layers):
        for row, (attr, label) in enumerate(
            (("grad_norms", "mean gradient norm"), ("param_norms", "parameter norm"))
        ):
            ax = figure.add_subplot(2, len(layers), row * len(layers) + column + 1)
            for group in _GROUPS:
                values = [getattr(r, attr).get(_key(layer, group), math.nan) for r in history.ranks]
                if not all(math.isnan(v) for v in values):
                    ax.plot(ranks, values, marker=".", label=group)
            ax.set_yscale("log")
            ax.set_xlabel("rank")
            ax.set_ylabel(label)
            ax.set_title(f"layer {layer!r}" if row == 0 else "")
            ax.legend(fontsize="small")
    return finish(figure, path, dpi)


def plot_landscapes(
    landscapes: Mapping[str, Landscape],
    path: str | Path | None = None,
    *,
    columns: int = 4,
    dpi: int = 100,
):
    """One panel per landscape: filled contours of log10(loss) for 2-D ones (the trained point
    marked), a curve for 1-D ones. Each panel has its own color scale: the shapes compare, the
    heights do not (the poster's landscapes "have no sense of scale" either)."""
    if not isinstance(landscapes, Mapping) or not landscapes:
        raise ValueError("argument 'landscapes' must be a non-empty mapping title -> Landscape")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"argument 'columns' must be a positive int, got {columns!r}")
    columns = min(columns, len(landscapes))
    rows = math.ceil(len(landscapes) / columns)
    figure = new_figure(figsize=(3.0 * columns, 2.7 * rows))
    for index, (title, landscape) in enumerate(landscapes.items()):
        if not isinstance(landscape, Landscape):
            raise TypeError(f"landscapes[{title!r}] must be a Landscape")
        ax = figure.add_subplot(rows, columns, index + 1)
        coords = landscape.coordinates.numpy()
        log_loss = landscape.losses.clamp_min(1e-300).log10().numpy()
        if landscape.losses.dim() == 2:
            # losses[i, j] is at (c[i], c[j]): i runs along the x axis.
            filled = ax.contourf(coords, coords, log_loss.T, levels=12, cmap="viridis")
            ax.contour(
                coords, coords, log_loss.T, levels=6, colors="white", linewidths=0.4, linestyles="-"
            )
            ax.plot([0], [0], marker="x", color="red")
            figure.colorbar(filled, ax=ax, label="log10 loss")
            ax.set_xlabel("direction 1")
            ax.set_ylabel("direction 2")
        else:
            ax.plot(coords, log_loss)
            ax.set_xlabel("direction 1")
            ax.set_ylabel("log10 loss")
        ax.set_title(title)
    return finish(figure, path, dpi)
