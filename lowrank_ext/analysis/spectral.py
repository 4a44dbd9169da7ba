"""Spectral analysis of weight matrices: ranks, spectra and a rank-collapse report.

`analyze(obj)` takes an `nn.Module`, a state_dict (nested mappings are flattened) or a single
tensor and returns a `SpectralReport`: one `LayerSpectrum` row per weight matrix, with
`to_markdown()`, `to_json()` and `to_csv()`. Figures are in `lowrank_ext.plots.spectral`.

Which matrices
    Linear, Embedding(Bag): the (out, in) / (num, dim) weight. Conv1d/2d/3d and their transposed
    forms: the kernel (d0, d1, k…) reshaped to the (d0, d1·k…) matrix that maps an unfolded input
    patch to the output channels (conv(x) = W @ unfold(x); a transposed conv is the adjoint of
    that map, with the same singular values); with groups g the operator is
    block-diagonal in the g blocks kernel[i·d0/g:(i+1)·d0/g].reshape(d0/g, -1), and its singular
    values are the union of the blocks'. transformers' Conv1D (GPT-2's projections, y = x W + b
    with W stored (in, out)): the (out, in) matrix Wᵀ, so its N×M reads out×in as a Linear's
    does (the singular values are those of W). MultiheadAttention: q, k and v projections (split
    from in_proj_weight, or q/k/v_proj_weight); out_proj is a Linear. Parametrized modules
    (`torch.nn.utils.parametrize`): the weight the parametrization computes, read in eval mode
    under no_grad so that e.g. spectral_norm's power iteration does not advance; every module's
    training flag is restored afterwards. Factored layers, analysed as W = U S Vᵀ: LowRankLinear
    and LowRankConv2d (also inside LowRankMultiheadAttention) in every state rank growth leaves
    (after `grow`/`freeze` the frozen components U_frozen, V_frozen, S_frozen come first, the
    active U, V projected out of their span; a layer frozen at full rank has no active U, V),
    any other module with 2-D tensors U (N, r) and V (M, r) and S (r,) or (r, r), and in a
    state_dict the same tensors under one prefix: the triple `<prefix>.U`, `<prefix>.S`,
    `<prefix>.V`, or a grown layer's `<prefix>.U_frozen`, `.V_frozen` (`.S_frozen`) with the
    active ones it has. The factors are those forward uses, from the module's tensors or the
    state_dict's alike (`lowrank_ext.nn.checkpoint.effective_factors`); tensors that do not
    form such a layout raise ValueError naming the layer.
    In a state_dict, a 2-D weight is read as stored: a Conv1D's (in, out) weight gives N×M =
    in×out (a state_dict does not tell it from a Linear's (out, in) one; the singular values and
    every measure below are the same for W and Wᵀ, only the shape reads transposed). The kernel
    of a grouped conv is read as the stacked (d0, d1·k…) matrix (a state_dict does not record
    the groups), `<prefix>.in_proj_weight` of shape (3E, E) is split into q, k, v, subtrees
    whose key starts with "optim" (optimizer moments, not weights) are skipped, and so are
    non-tensors, non-floating tensors and tensors with fewer than 2 dims.

How
    Dense: torch.linalg.svdvals in float64 (svd_dtype=torch.float32 is a faster option on GPU),
    never in half precision. Factored, without building W: U = Q_U R_U and V = Q_V R_V (reduced
    QR), so W = Q_U (R_U S R_Vᵀ) Q_Vᵀ and σ(W) = σ(R_U S R_Vᵀ), an r×r SVD: O((N+M)·r²) instead
    of O(N·M·min(N, M)). A rank-r W with r < min(N, M) has exactly min(N, M) − r zero singular
    values; they are reported as exact zeros (they are, mathematically), so its hard and
    numerical ranks are at most r.

Definitions, for W of shape N×M with singular values σ₁ ≥ … ≥ σ_p, p = min(N, M):
    aspect_ratio   Q = max(N, M) / min(N, M) ≥ 1.
    full_rank      the rank the layer can hold: p, or r for a factored layer of rank r.
    sigma_max      σ₁;  sigma_min  σ_f, the smallest of the full_rank values (σ_p, or σ_r for a
                   factored layer: its other p − r values are zero by construction, and a
                   collapse is judged over the r it holds); condition_number σ₁/σ_f (inf when
                   σ_f = 0).
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
    hard_tol       max(rtol · σ₁, atol, numerical_tol), a missing rtol or atol counting as 0
                   (rtol is 1e-3 when neither is given; both given: the larger tolerance wins,
                   scipy.linalg.pinv's rule): a singular value under the dtype's noise floor
                   never counts as rank.
    hard_rank      #{σᵢ > hard_tol}.
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

import math
from collections.abc import Mapping

import torch
from torch import nn

from .loading import _dense, _Layer, _module_layers, _read_only, _state_dict_layers
from .metrics import (
    _SVD_DTYPES,
    LayerSpectrum,
    _check_real,
    _spectrum,
    marchenko_pastur_density,
)
from .report import SpectralReport
from .suggest import suggest_ranks

__all__ = [
    "LayerSpectrum",
    "SpectralReport",
    "analyze",
    "marchenko_pastur_density",
    "suggest_ranks",
]


DEFAULT_RTOL = 1e-3


def analyze(
    obj: nn.Module | Mapping | torch.Tensor,
    *,
    rtol: float | None = None,
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
            σ ≤ max(rtol · σ_max, numerical_tol) counts as zero. Default 1e-3 when atol is not
            given either, else none (0).
        atol: absolute tolerance (≥ 0; the blog used 1e-3): σ ≤ max(atol, numerical_tol)
            counts as zero. Unlike rtol, its verdict changes when a layer is rescaled. With
            both, the larger tolerance applies: max(rtol · σ_max, atol, numerical_tol).
        collapse_fraction: a layer is collapsed when more than this fraction of its full_rank
            singular values are zero by the hard tolerance, in [0, 1). Default 0.1.
        svd_dtype: torch.float64 (default) or torch.float32 (faster on GPU); never half.
        device: where the SVDs run (default: where each weight is).
        name: the layer name when `obj` is a tensor.

    Returns a SpectralReport; the formulas of every field are in the module docstring.
    """
    if rtol is None and atol is None:
        rtol = DEFAULT_RTOL
    if rtol is not None:
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
        rtol=rtol or 0.0,
        atol=atol or 0.0,
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
                "(Linear, Conv, Conv1D, Embedding, MultiheadAttention, parametrized or factored "
                "U, S, V)"
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
