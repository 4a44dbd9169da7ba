"""Spectral analysis of weight matrices: ranks, spectra and a rank-collapse report.

`analyze(obj)` takes an `nn.Module`, a state_dict (nested mappings are flattened) or a single
tensor and returns a `SpectralReport`: one `LayerSpectrum` row per weight matrix, with
`to_markdown()`, `to_json()` and `to_csv()`. Figures are in `lowrank_ext.spectral_plots`.

Which matrices
    Linear, Embedding(Bag): the (out, in) / (num, dim) weight. Conv1d/2d/3d and their transposed
    forms: the kernel (d0, d1, k…) reshaped to the (d0, d1·k…) matrix that maps an unfolded input
    patch to the output channels (conv(x) = W @ unfold(x); a transposed conv is the adjoint of
    that map, with the same singular values); with groups g the operator is
    block-diagonal in the g blocks kernel[i·d0/g:(i+1)·d0/g].reshape(d0/g, -1), and its singular
    values are the union of the blocks'. MultiheadAttention: q, k and v projections (split from
    in_proj_weight, or q/k/v_proj_weight); out_proj is a Linear. Parametrized modules
    (`torch.nn.utils.parametrize`): the weight the parametrization computes, read in eval mode
    under no_grad so that e.g. spectral_norm's power iteration does not advance; every module's
    training flag is restored afterwards. Factored layers: a module with 2-D tensors U (N, r) and
    V (M, r) and S (r,) or (r, r) (LowRankLinear and anything shaped like it), and in a
    state_dict the triple `<prefix>.U`, `<prefix>.S`, `<prefix>.V`, analysed as W = U S Vᵀ.
    In a state_dict, the kernel of a grouped conv is read as the stacked (d0, d1·k…) matrix (a
    state_dict does not record the groups), `<prefix>.in_proj_weight` of shape (3E, E) is split
    into q, k, v, subtrees whose key starts with "optim" (optimizer moments, not weights) are
    skipped, and so are non-tensors, non-floating tensors and tensors with fewer than 2 dims.

How
    Dense: torch.linalg.svdvals in float64 (svd_dtype=torch.float32 is a faster option on GPU),
    never in half precision. Factored, without building W: U = Q_U R_U and V = Q_V R_V (reduced
    QR), so W = Q_U (R_U S R_Vᵀ) Q_Vᵀ and σ(W) = σ(R_U S R_Vᵀ), an r×r SVD: O((N+M)·r²) instead
    of O(N·M·min(N, M)). A rank-r W with r < min(N, M) has exactly min(N, M) − r zero singular
    values; they are reported as exact zeros (they are, mathematically), so its hard and
    numerical ranks are at most r.

Definitions, for W of shape N×M with singular values σ₁ ≥ … ≥ σ_p, p = min(N, M):
    aspect_ratio   Q = max(N, M) / min(N, M) ≥ 1.
    sigma_max      σ₁;  sigma_min  σ_p;  condition_number σ₁/σ_p (inf when σ_p = 0).
    frobenius_norm ‖W‖_F = √(Σσᵢ²).
    numerical_tol  dtype-aware noise floor, eps the machine epsilon of the weight's own dtype
                   (of the SVD dtype if that is coarser):
                   float32/float64: σ₁ · max(N, M) · eps (numpy.linalg.matrix_rank's rule);
                   float16/bfloat16: eps · ‖W‖_F. Rounding each entry to the nearest
                   representable value perturbs W by E with ‖E‖₂ ≤ ‖E‖_F ≤ (eps/2) ‖W‖_F, so by
                   Weyl's inequality a zero singular value of the unrounded matrix stays below
                   eps · ‖W‖_F ≤ σ₁ · √p · eps. (numpy's rule exceeds σ₁ in half
                   precision at common sizes: bfloat16 at 2048 gives 2048 · 2⁻⁷ · σ₁ = 16 σ₁.)
    numerical_rank #{σᵢ > numerical_tol}.
    hard_tol       max(rtol · σ₁, numerical_tol), or max(atol, numerical_tol) when atol is given:
                   a singular value under the dtype's noise floor never counts as rank.
    hard_rank      #{σᵢ > hard_tol}.
    full_rank      the rank the layer can hold: p, or r for a factored layer of rank r.
    collapsed_fraction  #{i ≤ full_rank : σᵢ ≤ hard_tol} / full_rank = 1 − hard_rank/full_rank.
    collapsed      collapsed_fraction > collapse_fraction (default 0.1: more than 10 % of the
                   layer's singular values are ≈ 0 relative to σ₁). collapse_fraction=0 is the
                   blog's rule "any σᵢ ≈ 0"; atol=1e-3 its absolute tolerance. A random square
                   matrix (Q = 1) has σ_p → 0 by Marchenko–Pastur but only a fraction ≈ 4·rtol/π
                   of its σ below rtol·σ₁, so it is not flagged.
    stable_rank    ‖W‖_F² / σ₁² = Σσᵢ²/σ₁².
    effective_rank exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ/Σσⱼ (Roy & Vetterli, 2007).
    energy_rank_90, energy_rank_99  smallest k with Σ_{i≤k} σᵢ² ≥ 0.90 (0.99) · Σσᵢ².
    mp_edge        s · (√N + √M) with s² = ‖W‖_F²/(N·M): the largest singular value of an N×M
                   matrix of i.i.d. entries of variance s² (Marchenko–Pastur bulk edge). s² is
                   estimated from W itself, so a strong signal inflates it (the edge is then
                   conservative).
    above_mp_edge  #{σᵢ > mp_edge}: directions that stand out of a random bulk.
A zero matrix has every rank, norm and edge 0, condition number inf, and is collapsed.

Bad input raises TypeError/ValueError naming the argument or the layer. Non-finite weights (NaN
or ±Inf) raise ValueError naming the layer: their spectrum is undefined.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LayerSpectrum",
    "SpectralReport",
    "analyze",
    "marchenko_pastur_density",
    "suggest_ranks",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_SVD_DTYPES = (torch.float32, torch.float64)
_ENERGY_ROUNDING = 1e-12  # keeps energy=1.0 from landing past the end through rounding


@dataclass(frozen=True)
class LayerSpectrum:
    """One weight matrix's spectrum and ranks; the fields are defined in the module docstring."""

    name: str
    kind: str
    dtype: str
    shape: tuple[int, int]
    aspect_ratio: float
    factored: bool
    full_rank: int
    sigma_max: float
    sigma_min: float
    condition_number: float
    frobenius_norm: float
    numerical_tol: float
    numerical_rank: int
    hard_tol: float
    hard_rank: int
    stable_rank: float
    effective_rank: float
    energy_rank_90: int
    energy_rank_99: int
    mp_edge: float
    above_mp_edge: int
    collapsed_fraction: float
    collapsed: bool
    singular_values: torch.Tensor = field(repr=False, compare=False)
    """All min(N, M) singular values, float64 on CPU, descending."""

    def as_dict(self, *, singular_values: bool = False) -> dict:
        """The scalar fields (shape as [N, M]), and the singular values as a list if asked."""
        row = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        row["shape"] = list(self.shape)
        if singular_values:
            row["singular_values"] = self.singular_values.tolist()
        return row


_SCALAR_FIELDS = [name for name in LayerSpectrum.__dataclass_fields__ if name != "singular_values"]

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
    smallest rank a LowRankLinear can have), also for an all-zero layer.
    """
    if not isinstance(report, SpectralReport):
        raise TypeError(
            f"argument 'report' must be a SpectralReport (from analyze), got "
            f"{type(report).__name__}"
        )
    _check_real("energy", energy, low=0.0, high=1.0, low_open=True)
    return {row.name: max(1, _energy_rank(row.singular_values, energy)) for row in report.rows}


def marchenko_pastur_density(
    eigenvalues: torch.Tensor, shape: tuple[int, int], variance: float
) -> torch.Tensor:
    """Density of the eigenvalues λ = σ² of WᵀW for an N×M W of i.i.d. entries of `variance` s².

    With N ≥ M (the shape is sorted), λ± = s² (√N ± √M)² and
    p(λ) = √((λ₊ − λ)(λ − λ₋)) / (2π s² M λ) on [λ₋, λ₊], 0 elsewhere; it integrates to 1 over
    the M eigenvalues.
    """
    rows, cols = max(shape), min(shape)
    if cols < 1 or variance <= 0:
        raise ValueError(f"need a non-empty shape and variance > 0, got {shape}, {variance}")
    lam = eigenvalues.double()
    low = variance * (math.sqrt(rows) - math.sqrt(cols)) ** 2
    high = variance * (math.sqrt(rows) + math.sqrt(cols)) ** 2
    inside = (lam > low) & (lam < high)
    span = ((high - lam) * (lam - low)).clamp(min=0)
    density = torch.sqrt(span) / (2 * math.pi * variance * cols * lam.clamp(min=1e-300))
    return torch.where(inside, density, torch.zeros_like(density))


# ---------------------------------------------------------------------------------------------
# Finding the matrices


class _Dense(NamedTuple):
    blocks: torch.Tensor  # (g, rows, cols): the block-diagonal operator diag(blocks[0], …)


class _Factored(NamedTuple):
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class _Layer(NamedTuple):
    name: str
    kind: str
    operator: _Dense | _Factored


def _dense(matrix: torch.Tensor, groups: int = 1) -> _Dense:
    return _Dense(matrix.reshape(groups, matrix.shape[0] // groups, math.prod(matrix.shape[1:])))


def _factors_of(module: nn.Module) -> _Factored | None:
    U, S, V = (getattr(module, name, None) for name in ("U", "S", "V"))
    if not all(torch.is_tensor(t) for t in (U, S, V)):
        return None
    if U.dim() != 2 or V.dim() != 2 or S.dim() not in (1, 2):
        return None
    return _Factored(U, S, V)


def _module_layers(model: nn.Module) -> Iterator[_Layer]:
    root = type(model).__name__
    for name, module in model.named_modules():
        name = name or root
        kind = type(module).__name__
        factors = _factors_of(module)
        if factors is not None:
            yield _Layer(name, kind, factors)
        elif isinstance(module, nn.MultiheadAttention):
            yield from _attention_layers(name, module)
        elif isinstance(module, nn.modules.conv._ConvNd):
            yield _Layer(name, kind, _dense(_weight_of(name, module), module.groups))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)) or (
            parametrize.is_parametrized(module, "weight") and module.weight.dim() >= 2
        ):
            yield _Layer(name, kind, _dense(_weight_of(name, module)))


def _weight_of(name: str, module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is lazy and not initialized yet: run one "
            "forward pass before analysing it"
        )
    return weight


def _attention_layers(name: str, module: nn.MultiheadAttention) -> Iterator[_Layer]:
    kind = type(module).__name__
    if module.in_proj_weight is not None:
        projections = module.in_proj_weight.chunk(3)
    else:
        projections = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    for letter, weight in zip("qkv", projections):
        yield _Layer(f"{name}.{letter}_proj", f"{kind}.{letter}_proj", _dense(weight))


def _flatten(mapping: Mapping, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in mapping.items():
        if not isinstance(value, Mapping):
            flat[f"{prefix}{key}"] = value
        elif not str(key).startswith("optim"):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _state_dict_layers(state_dict: Mapping) -> Iterator[_Layer]:
    tensors = {
        key: value
        for key, value in _flatten(state_dict).items()
        if torch.is_tensor(value) and value.is_floating_point()
    }
    factored = set()
    for key in list(tensors):
        if not (key == "U" or key.endswith(".U")):
            continue
        prefix = key[:-1]
        triple = [tensors.get(prefix + letter) for letter in "USV"]
        if any(t is None for t in triple):
            continue
        factored.update(prefix + letter for letter in "USV")
        yield _Layer(prefix.rstrip(".") or "W", "factored", _Factored(*triple))
    for key, tensor in tensors.items():
        if key in factored or tensor.dim() < 2:
            continue
        name = key.removesuffix(".weight")
        if key.endswith("in_proj_weight") and tensor.shape[0] == 3 * tensor.shape[1]:
            base = key.removesuffix("in_proj_weight").rstrip(".")
            for letter, weight in zip("qkv", tensor.chunk(3)):
                yield _Layer(f"{base}.{letter}_proj", f"in_proj.{letter}", _dense(weight))
        elif key.endswith(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            yield _Layer(key.removesuffix("_weight"), "projection", _dense(tensor))
        else:
            kind = "matrix" if tensor.dim() == 2 else f"kernel {tensor.dim() - 2}d"
            yield _Layer(name, kind, _dense(tensor))


@contextlib.contextmanager
def _read_only(model: nn.Module):
    """Eval mode and no_grad while reading weights; every module's training flag restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------
# The spectrum of one matrix


def _operator_shape(operator: _Dense | _Factored) -> tuple[int, int]:
    if isinstance(operator, _Factored):
        return operator.U.shape[0], operator.V.shape[0]
    groups, rows, cols = operator.blocks.shape
    return groups * rows, groups * cols


def _operator_tensors(operator: _Dense | _Factored) -> tuple[torch.Tensor, ...]:
    return tuple(operator) if isinstance(operator, _Factored) else (operator.blocks,)


def _check_factors(name: str, factors: _Factored) -> None:
    U, S, V = factors
    rank = U.shape[1] if U.dim() == 2 else -1
    if rank < 1 or V.dim() != 2 or V.shape[1] != rank or S.shape not in ((rank,), (rank, rank)):
        raise ValueError(
            f"layer {name!r}: U, S, V of shapes {tuple(U.shape)}, {tuple(S.shape)}, "
            f"{tuple(V.shape)} do not form W = U S Vᵀ (expected (N, r), (r,) or (r, r), (M, r) "
            "with r ≥ 1)"
        )


def _check_layer(layer: _Layer) -> None:
    if isinstance(layer.operator, _Factored):
        _check_factors(layer.name, layer.operator)
    rows, cols = _operator_shape(layer.operator)
    if rows == 0 or cols == 0:
        raise ValueError(f"layer {layer.name!r} has an empty weight of shape {rows}×{cols}")
    for tensor in _operator_tensors(layer.operator):
        if tensor.is_meta:
            raise ValueError(f"layer {layer.name!r} is on the meta device: it holds no values")
        if tensor.is_complex() or not tensor.is_floating_point():
            raise TypeError(
                f"layer {layer.name!r}: weights must be real floating point, got {tensor.dtype}"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nans = int(torch.isnan(tensor).sum())
            infs = int((~finite).sum()) - nans
            raise ValueError(
                f"layer {layer.name!r} has non-finite weights ({nans} NaN, {infs} ±Inf): its "
                "spectrum is undefined"
            )


def _singular_values(
    operator: _Dense | _Factored, svd_dtype: torch.dtype, device: torch.device | None
) -> tuple[torch.Tensor, int | None]:
    """All min(N, M) singular values (float64, CPU, descending) and the factored rank or None."""
    rows, cols = _operator_shape(operator)
    if isinstance(operator, _Factored):
        U, S, V = (t.detach().to(device=device, dtype=svd_dtype) for t in operator)
        _, r_u = torch.linalg.qr(U)
        _, r_v = torch.linalg.qr(V)
        core = torch.diag(S) if S.dim() == 1 else S
        sigma = torch.linalg.svdvals(r_u @ core @ r_v.T)
        rank = U.shape[1]
    else:
        blocks = operator.blocks.detach().to(device=device, dtype=svd_dtype)
        sigma = torch.linalg.svdvals(blocks).flatten()
        rank = None
    sigma = sigma.to(device="cpu", dtype=torch.float64).sort(descending=True).values
    padded = torch.zeros(min(rows, cols), dtype=torch.float64)
    count = min(sigma.numel(), padded.numel())
    padded[:count] = sigma[:count]
    return padded, rank


def _energy_rank(sigma: torch.Tensor, energy: float) -> int:
    power = sigma**2
    total = power.sum()
    if total == 0:
        return 0
    fraction = torch.cumsum(power, 0) / total
    target = torch.tensor(energy - _ENERGY_ROUNDING, dtype=fraction.dtype)
    return min(int(torch.searchsorted(fraction, target)) + 1, sigma.numel())


def _effective_rank(sigma: torch.Tensor) -> float:
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _numerical_tol(
    sigma_max: float, frobenius: float, shape: tuple[int, int], dtypes: list[torch.dtype]
) -> float:
    eps = max(torch.finfo(dtype).eps for dtype in dtypes)
    if any(dtype in _HALF_DTYPES for dtype in dtypes):
        return eps * frobenius
    return sigma_max * max(shape) * eps


def _spectrum(
    layer: _Layer,
    *,
    rtol: float,
    atol: float | None,
    collapse_fraction: float,
    svd_dtype: torch.dtype,
    device: torch.device | None,
) -> LayerSpectrum:
    _check_layer(layer)
    shape = _operator_shape(layer.operator)
    sigma, factored_rank = _singular_values(layer.operator, svd_dtype, device)
    weight_dtypes = sorted(
        {t.dtype for t in _operator_tensors(layer.operator)}, key=lambda d: -torch.finfo(d).eps
    )
    sigma_max, sigma_min = float(sigma[0]), float(sigma[-1])
    power = float((sigma**2).sum())
    frobenius = math.sqrt(power)
    numerical_tol = _numerical_tol(sigma_max, frobenius, shape, [weight_dtypes[0], svd_dtype])
    hard_tol = max(atol if atol is not None else rtol * sigma_max, numerical_tol)
    full_rank = sigma.numel() if factored_rank is None else min(sigma.numel(), factored_rank)
    hard_rank = int((sigma > hard_tol).sum())
    collapsed_fraction = 1.0 - min(hard_rank, full_rank) / full_rank
    long_side, short_side = max(shape), min(shape)
    mp_edge = math.sqrt(power / (long_side * short_side)) * (
        math.sqrt(long_side) + math.sqrt(short_side)
    )
    return LayerSpectrum(
        name=layer.name,
        kind=layer.kind,
        dtype=str(weight_dtypes[0]).removeprefix("torch."),
        shape=shape,
        aspect_ratio=long_side / short_side,
        factored=factored_rank is not None,
        full_rank=full_rank,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        condition_number=sigma_max / sigma_min if sigma_min > 0 else math.inf,
        frobenius_norm=frobenius,
        numerical_tol=numerical_tol,
        numerical_rank=int((sigma > numerical_tol).sum()),
        hard_tol=hard_tol,
        hard_rank=hard_rank,
        stable_rank=power / sigma_max**2 if sigma_max > 0 else 0.0,
        effective_rank=_effective_rank(sigma),
        energy_rank_90=_energy_rank(sigma, 0.9),
        energy_rank_99=_energy_rank(sigma, 0.99),
        mp_edge=mp_edge,
        above_mp_edge=int((sigma > mp_edge).sum()) if mp_edge > 0 else 0,
        collapsed_fraction=collapsed_fraction,
        collapsed=collapsed_fraction > collapse_fraction,
        singular_values=sigma,
    )


# ---------------------------------------------------------------------------------------------
# The entry point


def _check_real(name: str, value, *, low: float, high: float, low_open=False, high_open=False):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (
        not is_number
        or not math.isfinite(value)
        or (value <= low if low_open else value < low)
        or (value >= high if high_open else value > high)
    ):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"argument '{name}' must be a number in {interval}, got {value!r}")


def analyze(
    obj: nn.Module | Mapping | torch.Tensor,
    *,
    rtol: float = 1e-3,
    atol: float | None = None,
    collapse_fraction: float = 0.1,
    svd_dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    name: str = "W",
) -> SpectralReport:
    """Spectra, ranks and the rank-collapse flag of every weight matrix in `obj`.

    Args:
        obj: an nn.Module, a state_dict (nested mappings are flattened with dotted names) or one
            tensor with ≥ 2 dims (more than 2: a conv kernel, reshaped to (d0, d1·k…)).
        rtol: relative tolerance of the hard rank and the collapse flag, in [0, 1):
            σ ≤ max(rtol · σ_max, numerical_tol) counts as zero. Default 1e-3.
        atol: absolute tolerance (≥ 0) used instead of rtol when given (the blog used 1e-3).
            Unlike rtol, its verdict changes when a layer is rescaled.
        collapse_fraction: a layer is collapsed when more than this fraction of its full_rank
            singular values are zero by the hard tolerance, in [0, 1). Default 0.1.
        svd_dtype: torch.float64 (default) or torch.float32 (faster on GPU); never half.
        device: where the SVDs run (default: where each weight is).
        name: the layer name when `obj` is a tensor.

    Returns a SpectralReport; the formulas of every field are in the module docstring.
    """
    _check_real("rtol", rtol, low=0.0, high=1.0, high_open=True)
    if atol is not None:
        _check_real("atol", atol, low=0.0, high=math.inf, high_open=True)
    _check_real("collapse_fraction", collapse_fraction, low=0.0, high=1.0, high_open=True)
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(
            f"argument 'svd_dtype' must be torch.float32 or torch.float64 (the SVD never runs in "
            f"half precision), got {svd_dtype!r}"
        )
    device = None if device is None else torch.device(device)
    settings = dict(
        rtol=rtol,
        atol=atol,
        collapse_fraction=collapse_fraction,
        svd_dtype=svd_dtype,
        device=device,
    )

    if isinstance(obj, nn.Module):
        with _read_only(obj):
            rows = [_spectrum(layer, **settings) for layer in _module_layers(obj)]
        if not rows:
            raise ValueError(
                f"argument 'obj': the {type(obj).__name__} has no layer with a weight matrix "
                "(Linear, Conv, Embedding, MultiheadAttention, parametrized or factored U, S, V)"
            )
    elif isinstance(obj, Mapping):
        if not obj:
            raise ValueError("argument 'obj': the state_dict is empty")
        rows = [_spectrum(layer, **settings) for layer in _state_dict_layers(obj)]
        if not rows:
            raise ValueError(
                "argument 'obj': the state_dict holds no weight matrix (a floating-point tensor "
                "with ≥ 2 dims)"
            )
    elif torch.is_tensor(obj):
        if obj.dim() < 2:
            raise ValueError(
                f"argument 'obj': a weight matrix needs ≥ 2 dims, got a tensor of shape "
                f"{tuple(obj.shape)}"
            )
        kind = "matrix" if obj.dim() == 2 else f"kernel {obj.dim() - 2}d"
        rows = [_spectrum(_Layer(name, kind, _dense(obj)), **settings)]
    else:
        raise TypeError(
            "argument 'obj' must be an nn.Module, a state_dict (mapping) or a tensor, got "
            f"{type(obj).__name__}"
        )
    return SpectralReport(tuple(rows), rtol=rtol, atol=atol, collapse_fraction=collapse_fraction)
