"""The figure every plot draws on: a matplotlib Figure on its own Agg canvas, without pyplot, so
it needs no display and leaves the caller's pyplot backend and state alone. matplotlib is
imported here only, when a figure is drawn."""

from __future__ import annotations

from pathlib import Path


def new_figure(**kwargs):
    """matplotlib.figure.Figure(**kwargs) on an Agg canvas; ImportError naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "lowrank_ext.plots needs matplotlib: pip install lowrank_ext[plot]"
        ) from error
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def finish(figure, path, dpi):
    """Tight layout, saved to `path` if one is given; returns the figure."""
    figure.tight_layout()
    if path is not None:
        figure.savefig(Path(path), dpi=dpi)
    return figure
