"""The result of `lowrank_ext.analysis.spectral.analyze`: a `SpectralReport` of
`LayerSpectrum` rows, with its markdown, JSON and CSV forms.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .metrics import _SCALAR_FIELDS, LayerSpectrum


@dataclass(frozen=True)
class TableColumn:
    """A column of `SpectralReport.to_markdown`: its key (the JSON/CSV field it shows, "shape"
    for N×M), header, one-line meaning and how a row's cell is written."""

    key: str
    header: str
    meaning: str
    cell: Callable[[LayerSpectrum], str]


# Every column, in table order. The meanings are what `lowrank-ext analyze --help` prints.
TABLE_COLUMNS: tuple[TableColumn, ...] = (
    TableColumn(
        "name", "layer", "module name, or state_dict key without '.weight'", lambda r: r.name
    ),
    TableColumn(
        "kind",
        "type",
        "module class, or how a state_dict entry was read (matrix, kernel 2d, factored, ...)",
        lambda r: r.kind,
    ),
    TableColumn("dtype", "dtype", "the weight's dtype", lambda r: r.dtype),
    TableColumn(
        "shape",
        "N×M",
        "the matrix analysed: out × in (a conv kernel: out × in·k…)",
        lambda r: f"{r.shape[0]}×{r.shape[1]}",
    ),
    TableColumn(
        "aspect_ratio",
        "Q",
        "aspect ratio max(N, M)/min(N, M) ≥ 1",
        lambda r: _number(r.aspect_ratio),
    ),
    TableColumn("sigma_max", "σ_max", "largest singular value σ₁", lambda r: _number(r.sigma_max)),
    TableColumn(
        "sigma_min",
        "σ_min",
        "smallest of the layer's 'full' singular values: σ_p (p = min(N, M)), or σ_r for a "
        "factored layer of rank r (its other p − r are exact zeros by construction)",
        lambda r: _number(r.sigma_min),
    ),
    TableColumn(
        "condition_number",
        "cond",
        "σ_max/σ_min over the same values (inf when σ_min = 0)",
        lambda r: _number(r.condition_number),
    ),
    TableColumn(
        "hard_rank",
        "hard rank",
        "#σ > hard tolerance: max(rtol·σ_max, atol, numerical tolerance)",
        lambda r: str(r.hard_rank),
    ),
    TableColumn(
        "numerical_rank",
        "num. rank",
        "#σ > numerical tolerance: σ_max·max(N, M)·eps (float16/bfloat16: eps·‖W‖_F), eps of "
        "the weight's dtype",
        lambda r: str(r.numerical_rank),
    ),
    TableColumn(
        "full_rank",
        "full",
        "the rank the layer can hold: min(N, M), or r for a factored layer U S Vᵀ '(USVᵀ)'",
        lambda r: f"{r.full_rank}{' (USVᵀ)' if r.factored else ''}",
    ),
    TableColumn("stable_rank", "stable rank", "‖W‖_F²/σ_max²", lambda r: _number(r.stable_rank)),
    TableColumn(
        "effective_rank",
        "eff. rank",
        "exp of the entropy of σ/Σσ (Roy–Vetterli)",
        lambda r: _number(r.effective_rank),
    ),
    TableColumn(
        "energy_rank_90",
        "r90%",
        "smallest k whose k largest σ hold 90 % of Σσ²",
        lambda r: str(r.energy_rank_90),
    ),
    TableColumn("energy_rank_99", "r99%", "the same for 99 %", lambda r: str(r.energy_rank_99)),
    TableColumn(
        "mp_edge",
        "MP edge",
        "Marchenko–Pastur bulk edge s·(√N + √M), s² = ‖W‖_F²/(N·M): σ₁ of a random matrix",
        lambda r: _number(r.mp_edge),
    ),
    TableColumn("above_mp_edge", "σ>MP", "#σ above the MP edge", lambda r: str(r.above_mp_edge)),
    TableColumn(
        "collapsed",
        "collapsed",
        "yes when more than collapse_fraction of the 'full' σ are ≤ the hard tolerance; the "
        "fraction that are",
        lambda r: f"{'yes' if r.collapsed else 'no'} ({r.collapsed_fraction:.0%})",
    ),
)
_COLUMNS_BY_KEY = {column.key: column for column in TABLE_COLUMNS}

# The columns of the CLI's default table: one line a layer within 120 characters.
COMPACT_COLUMNS = ("name", "shape", "sigma_max", "sigma_min", "hard_rank", "full_rank", "collapsed")
_MIN_NAME_WIDTH = 12


def _elide(text: str, width: int) -> str:
    """text, or its start and end around "…" in `width` characters."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _number(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class SpectralReport:
    """The rows of `analyze`, with the tolerances they were computed at (rtol or atol None:
    not used).

    Index it by position or by layer name; iterate over the rows.
    """

    rows: tuple[LayerSpectrum, ...]
    rtol: float | None
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
        tolerances = [f"{self.rtol:g}·σ_max"] if self.rtol is not None else []
        tolerances += [f"{self.atol:g}"] if self.atol is not None else []
        tolerance = ", ".join(tolerances)
        return (
            f"collapsed: more than {self.collapse_fraction:.0%} of a layer's full-rank singular "
            f"values ≤ max({tolerance}, numerical tolerance)"
        )

    def summary(self) -> str:
        collapsed = self.collapsed_layers
        listed = f": {', '.join(collapsed)}" if collapsed else ""
        return f"{len(self.rows)} layers, {len(collapsed)} collapsed{listed} ({self.rule()})"

    def to_markdown(
        self, columns: Sequence[str] | None = None, *, max_width: int | None = None
    ) -> str:
        """A markdown table, its columns padded so that it also reads as plain text.

        Args:
            columns: keys of `TABLE_COLUMNS` to show, in that order (default: all 18;
                `COMPACT_COLUMNS` is the CLI's default).
            max_width: when the lines would be longer, layer names are shortened in the middle
                ("…") down to 12 characters; other cells are never cut.

        Raises:
            ValueError: an unknown column key (the message lists the known ones), or an empty
                list.
        """
        keys = [column.key for column in TABLE_COLUMNS] if columns is None else list(columns)
        unknown = [key for key in keys if key not in _COLUMNS_BY_KEY]
        if unknown or not keys:
            raise ValueError(
                f"argument 'columns': unknown column(s) {', '.join(map(repr, unknown))}; known: "
                f"{', '.join(_COLUMNS_BY_KEY)}"
                if unknown
                else "argument 'columns' is empty; name at least one column"
            )
        chosen = [_COLUMNS_BY_KEY[key] for key in keys]
        cells = [[column.header for column in chosen]]
        cells += [[column.cell(row) for column in chosen] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(chosen))]
        total = sum(widths) + 3 * len(widths) + 1
        if max_width is not None and "name" in keys and total > max_width:
            i = keys.index("name")
            widths[i] = max(_MIN_NAME_WIDTH, len(chosen[i].header), widths[i] - (total - max_width))
            for line in cells[1:]:
                line[i] = _elide(line[i], widths[i])
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
