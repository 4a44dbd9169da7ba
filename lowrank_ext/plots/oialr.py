"""Figures of OIALR training: the rank of every layer against the training step.

Needs matplotlib (`pip install lowrank_ext[plot]`), imported only when a figure is drawn, on an
Agg canvas without pyplot. Every function returns the figure and saves it if given a path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ._canvas import finish, new_figure

__all__ = ["plot_rank_history"]

_STYLES = ("-", "--", "-.", ":")


def _check_history(title: str, history) -> list[dict]:
    entries = list(history) if isinstance(history, Sequence) else None
    if not entries or not all(
        isinstance(e, Mapping) and isinstance(e.get("ranks"), Mapping) and "step" in e
        for e in entries
    ):
        raise ValueError(
            f"histories[{title!r}] must be a non-empty OIALR.history (a list of {{step, ranks}}, "
            "the first entry the conversion), got "
            f"{history!r:.80}"
        )
    return entries


def plot_rank_history(
    histories: Mapping[str, Sequence[Mapping]],
    path: str | Path | None = None,
    *,
    end_steps: Mapping[str, int] | None = None,
    label: Callable[[str], str] = str,
    dpi: int = 100,
):
    """One panel per run, titled by its key in `histories` ({title: OIALR.history}): the rank
    of every layer (log₂ axis) against the training step.

    Each layer is drawn at its full rank from step 0 (dense training) through the conversion,
    the history's first entry (the dashed line), then at the rank each update left, until
    `end_steps[title]` (default: the step of the last update). `label` names a layer in the
    legend (default: its qualified name), followed by its full rank.
    """
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("argument 'histories' must be a non-empty mapping title -> OIALR.history")
    runs = {title: _check_history(title, history) for title, history in histories.items()}
    end_steps = {} if end_steps is None else end_steps
    figure = new_figure(figsize=(4.2 * len(runs), 3.6))
    for index, (title, history) in enumerate(runs.items()):
        ax = figure.add_subplot(1, len(runs), index + 1)
        steps = [0] + [entry["step"] for entry in history]
        steps.append(end_steps.get(title, steps[-1]))
        for number, (layer, full) in enumerate(history[0]["ranks"].items()):
            ranks = [full] + [entry["ranks"][layer] for entry in history]
            ranks.append(ranks[-1])
            ax.step(
                steps,
                ranks,
                where="post",
                linestyle=_STYLES[number % len(_STYLES)],
                label=f"{label(layer)} (full {full})",
            )
        ax.axvline(
            history[0]["step"], color="grey", linestyle="--", linewidth=1, label="conversion"
        )
        ax.set_yscale("log", base=2)
        ax.set_xlabel("training step")
        ax.set_ylabel("rank")
        ax.set_title(title)
        ax.legend(fontsize="small")
    return finish(figure, path, dpi)
