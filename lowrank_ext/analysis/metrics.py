"""The spectrum of one weight matrix: its singular values and every measure of a
`LayerSpectrum` row (the definitions are in `lowrank_ext.analysis.spectral`'s docstring), and
the Marchenko–Pastur law they are compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import linalg
from ..nn.truncation import energy_rank
from .loading import (
    _check_factors,
    _effective,
    _Factored,
    _Layer,
    _operator_shape,
    _operator_tensors,
)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_SVD_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LayerSpectrum:
    """One weight matrix's spectrum and ranks; the fields are defined in
    `lowrank_ext.analysis.spectral`'s docstring."""

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


def _check_layer(layer: _Layer) -> None:
    if isinstance(layer.operator, _Factored):
        _check_factors(layer.name, layer.operator.parts)
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
    layer: _Layer, svd_dtype: torch.dtype, device: torch.device | None
) -> tuple[torch.Tensor, int | None]:
    """All min(N, M) singular values (float64, CPU, descending) and the factored rank or None."""
    operator = layer.operator
    rows, cols = _operator_shape(operator)
    if isinstance(operator, _Factored):
        try:
            U, S, V = _effective(operator.parts, device=device, dtype=svd_dtype)
        except RuntimeError as error:  # project_out refuses an active column in the frozen span
            raise ValueError(f"layer {layer.name!r}: {error}") from None
        _, r_u = torch.linalg.qr(U)
        _, r_v = torch.linalg.qr(V)
        core = torch.diag(S) if S.dim() == 1 else S
        sigma = linalg.svdvals(r_u @ core @ r_v.T)
        rank = U.shape[1]
    else:
        blocks = operator.blocks.detach().to(device=device, dtype=svd_dtype)
        sigma = linalg.svdvals(blocks).flatten()
        rank = None
    sigma = sigma.to(device="cpu", dtype=torch.float64).sort(descending=True).values
    padded = torch.zeros(min(rows, cols), dtype=torch.float64)
    count = min(sigma.numel(), padded.numel())
    padded[:count] = sigma[:count]
    return padded, rank


def _energy_rank(sigma: torch.Tensor, energy: float) -> int:
    # The report shows 0 for a zero matrix; otherwise the package's one rule (nn.energy_rank).
    if not bool((sigma != 0).any()):
        return 0
    return energy_rank(sigma, energy)


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
    atol: float,
    collapse_fraction: float,
    svd_dtype: torch.dtype,
    device: torch.device | None,
) -> LayerSpectrum:
    _check_layer(layer)
    shape = _operator_shape(layer.operator)
    sigma, factored_rank = _singular_values(layer, svd_dtype, device)
    weight_dtypes = sorted(
        {t.dtype for t in _operator_tensors(layer.operator)}, key=lambda d: -torch.finfo(d).eps
    )
    full_rank = sigma.numel() if factored_rank is None else min(sigma.numel(), factored_rank)
    # σ_min and the condition number over the values the layer can hold (a factored layer's
    # other min(N, M) − r singular values are zero by construction, not by collapse).
    sigma_max, sigma_min = float(sigma[0]), float(sigma[full_rank - 1])
    # Squares of σ scaled by σ_max: σ of 1e-200 (or 1e200) would under- (over-)flow in float64.
    relative_power = float(((sigma / sigma_max) ** 2).sum()) if sigma_max > 0 else 0.0
    frobenius = sigma_max * math.sqrt(relative_power)
    numerical_tol = _numerical_tol(sigma_max, frobenius, shape, [weight_dtypes[0], svd_dtype])
    hard_tol = max(rtol * sigma_max, atol, numerical_tol)
    hard_rank = int((sigma > hard_tol).sum())
    collapsed_fraction = 1.0 - min(hard_rank, full_rank) / full_rank
    long_side, short_side = max(shape), min(shape)
    mp_edge = (
        frobenius
        / math.sqrt(long_side * short_side)
        * (math.sqrt(long_side) + math.sqrt(short_side))
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
        stable_rank=relative_power,
        effective_rank=_effective_rank(sigma),
        energy_rank_90=_energy_rank(sigma, 0.9),
        energy_rank_99=_energy_rank(sigma, 0.99),
        mp_edge=mp_edge,
        above_mp_edge=int((sigma > mp_edge).sum()) if mp_edge > 0 else 0,
        collapsed_fraction=collapsed_fraction,
        collapsed=collapsed_fraction > collapse_fraction,
        singular_values=sigma,
    )


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
