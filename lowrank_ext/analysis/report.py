"""The result of `lowrank_ext.analysis.spectral.analyze`: a `SpectralReport` of
`LayerSpectrum` rows, with its markdown, JSON and CSV forms, and `suggest_ranks`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

from .metrics import _SCALAR_FIELDS, LayerSpectrum, _check_real, _energy_rank

# (header, getter) of the table columns in to_markdown().
_TABLE_COLUMNS = [
    ("layer", lambda r: r.name),
    ("type", lambda r: r.kind),
    ("dtype", lambda r: r.dtype),
    ("N×M", lambda r: f"{r.shape[0]}×{r.shape[1]}"),
    ("Q", lambda r: _number(r.aspect_ratio)),
    ("σ_max", lambda r: _number(r.sigma_max)),
    ("σ_min", lambda r: _number(r.sigma_min)),
    ("cond", lambda r: _number(r.condition_number)),
    ("hard rank", lambda r: str(r.hard_rank)),
    ("num. rank", lambda r: str(r.numerical_rank)),
    ("full", lambda r: f"{r.full_rank}{' (USVᵀ)' if r.factored else ''}"),
    ("stable rank", lambda r: _number(r.stable_rank)),
    ("eff. rank", lambda r: _number(r.effective_rank)),
    ("r90%", lambda r: str(r.energy_rank_90)),
    ("r99%", lambda r: str(r.energy_rank_99)),
    ("MP edge", lambda r: _number(r.mp_edge)),
    ("σ>MP", lambda r: str(r.above_mp_edge)),
    ("collapsed", lambda r: f"{'yes' if r.collapsed else 'no'} ({r.collapsed_fraction:.0%})"),
]


def _number(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class SpectralReport:
    """The rows of `analyze`, with the tolerances they were computed at.

    Index it by position or by layer name; iterate over the rows.
    """

    rows: tuple[LayerSpectrum, ...]
    rtol: float
    atol: float | None
    collapse_fraction: float

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerSpectrum]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> LayerSpectrum:
        if isinstance(key, str):
            for row in self.rows:
                if row.name == key:
                    return row
            raise KeyError(f"no layer named {key!r}; layers: {[r.name for r in self.rows]}")
        return self.rows[key]

    @property
    def collapsed_layers(self) -> list[str]:
        return [row.name for row in self.rows if row.collapsed]

    def rule(self) -> str:
        """The collapse rule in words."""
        tolerance = f"{self.atol:g}" if self.atol is not None else f"{self.rtol:g}·σ_max"
        return (
            f"collapsed: more than {self.collapse_fraction:.0%} of a layer's full-rank singular "
            f"values ≤ max({tolerance}, numerical tolerance)"
        )

    def summary(self) -> str:
        collapsed = self.collapsed_layers
        listed = f": {', '.join(collapsed)}" if collapsed else ""
        return f"{len(self.rows)} layers, {len(collapsed)} collapsed{listed} ({self.rule()})"

    def to_markdown(self) -> str:
        """A markdown table, its columns padded so that it also reads as plain text."""
        cells = [[header for header, _ in _TABLE_COLUMNS]]
        cells += [[getter(row) for _, getter in _TABLE_COLUMNS] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(_TABLE_COLUMNS))]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def to_json(self, *, singular_values: bool = False, indent: int | None = 2) -> str:
        """JSON with the settings and the rows; an infinite condition number is null."""
        document = {
            "settings": {
                "rtol": self.rtol,
                "atol": self.atol,
                "collapse_fraction": self.collapse_fraction,
                "rule": self.rule(),
            },
            "layers": [
                _finite_or_none(row.as_dict(singular_values=singular_values)) for row in self.rows
            ],
        }
        return json.dumps(document, indent=indent, allow_nan=False, ensure_ascii=False)

    def to_csv(self) -> str:
        """CSV, one line per layer, the scalar fields as columns (shape as "NxM")."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_SCALAR_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            values = row.as_dict()
            values["shape"] = f"{row.shape[0]}x{row.shape[1]}"
            writer.writerow(values)
        return buffer.getvalue()


def _finite_or_none(row: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def suggest_ranks(report: SpectralReport, energy: float = 0.9) -> dict[str, int]:
    """{layer name: smallest k whose k largest σ hold `energy` of Σσ²}, energy in (0, 1].

    For `LowRankLinear.from_linear(linear, rank=...)` and model conversion; at least 1 (the
    smallest rank a LowRankLinear can have), also for an all-zero layer. A rank above the
    layer's `lowrank_ext.break_even_rank` makes it larger than dense: from_linear refuses it
    without allow_larger=True, convert keeps that layer dense.
    """
    if not isinstance(report, SpectralReport):
        raise TypeError(
            f"argument 'report' must be a SpectralReport (from analyze), got "
            f"{type(report).__name__}"
        )
    _check_real("energy", energy, low=0.0, high=1.0, low_open=True)
    return {row.name: max(1, _energy_rank(row.singular_values, energy)) for row in report.rows}
