"""Figures of a `lowrank_ext.analysis.spectral` report: σ_min histogram, σ spectra, ESD with the
MP law.

Needs matplotlib (`pip install lowrank_ext[plot]`). Figures are drawn on matplotlib's Agg canvas
through `matplotlib.figure.Figure`, so the caller's pyplot backend and state are left alone.
Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..analysis.spectral import LayerSpectrum, SpectralReport, marchenko_pastur_density
from ._canvas import new_figure

# σ/σ_max at or below this is drawn at this value on log axes (exact zeros included).
RELATIVE_FLOOR = 1e-17


def _figure(width: float = 6.4, height: float = 4.0):
    return new_figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _labelled(reports: SpectralReport | Mapping[str, SpectralReport]) -> dict[str, SpectralReport]:
    if isinstance(reports, SpectralReport):
        return {"": reports}
    if isinstance(reports, Mapping) and all(
        isinstance(r, SpectralReport) for r in reports.values()
    ):
        return dict(reports)
    raise TypeError(
        "argument 'reports' must be a SpectralReport or a mapping {label: SpectralReport}, got "
        f"{type(reports).__name__}"
    )


def _relative(row: LayerSpectrum) -> torch.Tensor:
    scale = row.sigma_max if row.sigma_max > 0 else 1.0
    return (row.singular_values / scale).clamp(min=RELATIVE_FLOOR)


def _relative_sigma_min(row: LayerSpectrum) -> float:
    scale = row.sigma_max if row.sigma_max > 0 else 1.0
    return max(row.sigma_min / scale, RELATIVE_FLOOR)


def plot_sigma_min_histogram(
    reports: SpectralReport | Mapping[str, SpectralReport],
    path,
    *,
    relative: bool = True,
    bins: int = 30,
) -> Path:
    """Histogram of σ_min across layers (the blog's figure), one colour per labelled report.

    σ_min is the row's (of a factored layer of rank r: σ_r, see `LayerSpectrum`).
    relative=True (default) bins σ_min/σ_max on a log axis, values ≤ RELATIVE_FLOOR (exact zeros
    included) drawn at the floor; relative=False bins σ_min itself, linearly.
    """
    labelled = _labelled(reports)
    values = {
        label: [_relative_sigma_min(row) if relative else row.sigma_min for row in report]
        for label, report in labelled.items()
    }
    everything = [v for vs in values.values() for v in vs]
    if relative:
        low, high = math.log10(min(everything)), math.log10(max(everything))
        edges = torch.logspace(low - 0.5, high + 0.5, bins + 1).tolist()
    else:
        edges = torch.linspace(0.0, max(everything) * 1.05 or 1.0, bins + 1).tolist()
    figure = _figure()
    axes = figure.subplots()
    axes.hist(list(values.values()), bins=edges, label=list(values), stacked=False)
    if relative:
        axes.set_xscale("log")
        axes.set_xlabel(f"σ_min / σ_max  (≤ {RELATIVE_FLOOR:g}, zeros included, at the floor)")
    else:
        axes.set_xlabel("σ_min")
    axes.set_ylabel("layers")
    axes.set_title("Smallest singular value per layer")
    if any(values):  # labels, when several reports are compared
        axes.legend()
    return _save(figure, path)


def plot_spectra(
    reports: SpectralReport | Mapping[str, SpectralReport],
    path,
    *,
    layers: list[str] | None = None,
) -> Path:
    """σᵢ/σ_max against i on a log axis, one line per layer (and linestyle per report)."""
    labelled = _labelled(reports)
    figure = _figure()
    axes = figure.subplots()
    styles = ["-", "--", ":", "-."]
    for index, (label, report) in enumerate(labelled.items()):
        for row in report:
            if layers is not None and row.name not in layers:
                continue
            name = f"{label}: {row.name}" if label else row.name
            axes.plot(
                range(1, row.singular_values.numel() + 1),
                _relative(row).tolist(),
                styles[index % len(styles)],
                label=name,
            )
    axes.set_yscale("log")
    axes.set_xlabel("index i")
    axes.set_ylabel("σᵢ / σ_max")
    axes.set_title("Singular value spectra")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_esd(row: LayerSpectrum, path, *, bins: int = 60) -> Path:
    """Empirical spectral density of WᵀW — a density histogram of λ = σ² in log-spaced bins, on
    log–log axes — with the Marchenko–Pastur density of a random matrix of the same shape and
    variance s² = ‖W‖_F²/(N·M). Zero eigenvalues (a factored layer has min(N, M) − r) are drawn at
    the left edge, a tenth of the smallest positive λ or of the MP support's lower end."""
    if not isinstance(row, LayerSpectrum):
        raise TypeError(f"argument 'row' must be a LayerSpectrum, got {type(row).__name__}")
    eigenvalues = row.singular_values**2
    positive = eigenvalues[eigenvalues > 0]
    if positive.numel() == 0:
        raise ValueError(f"layer {row.name!r} is all zeros: it has no spectrum to plot")
    variance = row.frobenius_norm**2 / (row.shape[0] * row.shape[1])
    long_side, short_side = max(row.shape), min(row.shape)
    mp_low = variance * (math.sqrt(long_side) - math.sqrt(short_side)) ** 2
    mp_high = row.mp_edge**2
    zeros = eigenvalues.numel() - positive.numel()
    floor = min(float(positive.min()), mp_low if mp_low > 0 else math.inf) / 10
    top = max(float(positive.max()), mp_high) * 1.05
    edges = torch.logspace(math.log10(floor), math.log10(top), bins + 1, dtype=torch.float64)
    figure = _figure()
    axes = figure.subplots()
    heights, _, _ = axes.hist(
        eigenvalues.clamp(min=float(edges[0])).tolist(),  # edges[0] ≈ floor, rounded
        bins=edges.tolist(),
        density=True,
        alpha=0.6,
        label=f"ESD of WᵀW{f' ({zeros} zeros, at the left edge)' if zeros else ''}",
    )
    # Sampled on the law's own support [λ₋, λ₊], log-spaced like the bins.
    grid = torch.logspace(
        math.log10(max(mp_low, floor)), math.log10(mp_high), 400, dtype=torch.float64
    )
    density = marchenko_pastur_density(grid, row.shape, variance)
    axes.plot(grid.tolist(), density.tolist(), "r-", label="Marchenko–Pastur")
    axes.axvline(mp_high, color="r", linestyle=":", label="MP bulk edge")
    axes.set_xscale("log")
    axes.set_yscale("log")
    # The MP curve drops to 0 at its edges; keep the axis on the histogram's scale.
    axes.set_ylim(bottom=0.3 * min(h for h in heights if h > 0))
    axes.set_xlabel("λ = σ²")
    axes.set_ylabel("density")
    axes.set_title(f"{row.name}  ({row.shape[0]}×{row.shape[1]}, Q = {row.aspect_ratio:.3g})")
    axes.legend()
    return _save(figure, path)


def save_report_figures(report: SpectralReport, directory) -> list[Path]:
    """σ_min histogram, spectra and one ESD per layer (esd/<layer>.png) under `directory`."""
    if not isinstance(report, SpectralReport):
        raise TypeError(f"argument 'report' must be a SpectralReport, got {type(report).__name__}")
    directory = Path(directory)
    paths = [
        plot_sigma_min_histogram(report, directory / "sigma_min_histogram.png"),
        plot_spectra(report, directory / "spectra.png"),
    ]
    for row in report:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", row.name)
        paths.append(plot_esd(row, directory / "esd" / f"{safe}.png"))
    return paths
