"""`suggest_ranks`: ranks by the energy rule, for a whole model's conversion or per matrix.

Given a model, the suggestion is a `rank_pattern` for `lowrank_ext.convert` of the same model:
one entry per module convert would convert with the same `target_modules` and
`exclude_modules`, keyed by its full name (a key convert gives to that module alone), its rank
taken from the matrix convert factorizes. Given a `SpectralReport`, one entry per row, for
`LowRankLinear.from_linear` and the like.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..nn.convert import select_targets
from ..nn.hf_conv1d import conv1d_matrix, is_conv1d
from ..nn.truncation import energy_rank
from .loading import _dense, _Layer, _read_only
from .metrics import _check_real, _spectrum
from .report import SpectralReport

__all__ = ["suggest_ranks"]


def suggest_ranks(
    obj: nn.Module | SpectralReport,
    energy: float = 0.9,
    *,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> dict[str, int]:
    """Ranks by the energy rule: per matrix, the smallest k whose k largest singular values hold
    `energy` of Σσ² (Eckart–Young: the rank-k truncation keeps that fraction of ‖W‖_F²), at
    least 1 (the smallest rank a factorization has, also for an all-zero matrix).

    Args:
        obj: an nn.Module: ranks for exactly the modules `lowrank_ext.convert(obj,
            target_modules=..., exclude_modules=...)` converts (by default every nn.Linear,
            transformers Conv1D, nn.Conv2d with groups=1 and nn.MultiheadAttention except the
            output layer, so no embedding and no LM head), in model order, so that
            `convert(obj, rank_pattern=suggest_ranks(obj, ...))` applies each rank to its
            module. Or a SpectralReport (from `analyze`): {row name: rank} for every row, for
            `LowRankLinear.from_linear(..., rank=...)` on single layers (its rows include
            embeddings, the output layer and q/k/v rows, which convert does not target).
        energy: the fraction of Σσ² to keep, in (0, 1].
        target_modules, exclude_modules: as `lowrank_ext.convert` takes them; a model only.

    Returns {name: rank}. For a model the name is the module's full name (a key equal to it
    is that module's own in convert's rank_pattern) and the rank is of the matrix convert
    factorizes: the weight (out, in), a Conv1D's Wᵀ, a Conv2d's kernel as (out, in·kh·kw).
    An nn.MultiheadAttention gets one rank for all its projections (convert takes one): the
    largest of its projections' (the packed (3E, E) in_proj, or q, k and v_proj, and
    out_proj), so each keeps at least `energy`, capped at the smallest projection's
    min(in, out). The singular values are computed in float64 (`analyze`'s), with the model
    in eval mode under no_grad (restored afterwards; parametrized weights as forward reads them
    in eval mode).

    A suggested rank above a module's break-even rank (`lowrank_ext.nn.break_even_rank`; for
    an attention module any projection's) makes its factorization larger than the dense
    module: convert keeps that module dense with a UserWarning unless allow_larger=True.

    Raises TypeError when `obj` is neither, ValueError for an energy outside (0, 1], a
    target/exclude entry that matches nothing or a targeted module convert cannot convert (as
    convert does), target_modules/exclude_modules given with a report, and non-finite weights
    (naming the module).
    """
    _check_real("energy", energy, low=0.0, high=1.0, low_open=True)
    if isinstance(obj, SpectralReport):
        if target_modules is not None or exclude_modules is not None:
            raise ValueError(
                "arguments 'target_modules' and 'exclude_modules' select modules of a model: pass "
                "the model, not a SpectralReport (whose rows need not be modules)"
            )
        return {row.name: _rank(row.singular_values, energy) for row in obj.rows}
    if not isinstance(obj, nn.Module):
        raise TypeError(
            "argument 'obj' must be an nn.Module (the model to convert) or a SpectralReport "
            f"(from analyze), got {type(obj).__name__}"
        )
    ranks = {}
    with _read_only(obj):  # also for the selection, which reads weights (parametrized ones too)
        named = dict(obj.named_modules())
        modules = {n: named[n] for n in select_targets(obj, target_modules, exclude_modules)}
        for name, module in modules.items():
            matrices = _matrices(name, module)
            largest = max(_matrix_rank(f"{name}{part}", W, energy) for part, W in matrices.items())
            ranks[name] = min(largest, *(min(W.shape) for W in matrices.values()))
    return ranks


def _rank(singular_values: torch.Tensor, energy: float) -> int:
    return energy_rank(singular_values, energy)


def _matrix_rank(name: str, matrix: torch.Tensor, energy: float) -> int:
    row = _spectrum(
        _Layer(name, "matrix", _dense(matrix)),
        rtol=0.0,
        atol=0.0,
        collapse_fraction=0.0,
        svd_dtype=torch.float64,
        device=None,
    )
    return _rank(row.singular_values, energy)


def _matrices(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The (out, in) matrices convert factorizes for `module`, by projection ("" for one)."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            parts = {".in_proj": module.in_proj_weight}
        else:
            parts = {f".{p}_proj": getattr(module, f"{p}_proj_weight") for p in "qkv"}
        return parts | {".out_proj": module.out_proj.weight}
    if is_conv1d(module):
        return {"": conv1d_matrix(module, f"module {name!r} ({type(module).__name__})")}
    weight = module.weight
    return {"": weight.reshape(weight.shape[0], -1)}  # a Conv2d kernel as (out, in·kh·kw)
