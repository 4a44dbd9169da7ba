"""How a factorization's rank is chosen, and when it stops paying: the truncated SVD, the energy
rule, and the break-even rank past which U S Vᵀ holds more numbers than the dense W.

A rank-r factorization of an out×in matrix holds U (out, r), V (in, r) and S: r numbers
(core="diag") or r² (core="full"), so r·(in + out) + r or r·(in + out) + r² against in·out
dense. The bias is the same on both sides and counted on neither. The break-even rank is the
largest r that holds no more than in·out: ⌊in·out / (in + out + 1)⌋ for "diag", roughly
in·out / (in + out) in general, and always below min(in, out): a full-rank factorization is
larger than the matrix it factorizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import linalg, ops

_CORES = ("diag", "full")


def _check_rank(rank, in_features: int, out_features: int) -> int:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            "argument 'rank' must be an int in [1, min(in_features, out_features)] = "
            f"[1, {limit}], got {rank!r}"
        )
    return rank


def _check_core(core) -> str:
    if core not in _CORES:
        raise ValueError(f"argument 'core' must be one of {_CORES}, got {core!r}")
    return core


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k whose k largest singular values hold `energy` of Σσ² (energy in (0, 1]).

    The rule of every energy choice of a factorization (from_linear, from_conv2d, from_conv1d,
    from_multihead_attention, convert, set_weight; OIALR's cut keeps one component of a zero
    core likewise): a zero matrix (Σσ² = 0) has rank 1, the smallest a factorization can have,
    whatever `energy`. σ is scaled by σ_max before squaring, so tiny matrices (σ of
    1e-200) keep their energy split. Raises ValueError for an energy outside (0, 1] and for
    singular values that are not finite or negative.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"argument 'energy' must be a number in (0, 1], got {energy!r}")
    sigma = singular_values.detach().double().flatten()
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError("energy_rank: the singular values must be finite and >= 0")
    largest = sigma.max() if sigma.numel() else sigma.new_zeros(())
    if largest == 0:
        return 1
    power = (sigma.sort(descending=True).values / largest) ** 2
    fraction = torch.cumsum(power, 0) / power.sum()
    # The tolerance keeps energy=1.0 from landing past the end through rounding.
    target = torch.tensor(energy - 1e-12, dtype=fraction.dtype)
    return min(int(torch.searchsorted(fraction, target)) + 1, sigma.numel())


def check_matrix(weight, what: str) -> torch.Tensor:
    """`weight`, checked to be something an SVD can factorize; errors start with `what`, which
    names it ("the weight of argument 'linear'", "in_proj_weight of argument 'attention'", ...).

    Raises TypeError (not a tensor, not real floating point) and ValueError (lazy, on the meta
    device, not dense, holding NaN or inf: an SVD would spread them over every factor, so every
    output of the layer would be NaN, or fail in LAPACK with a message naming nothing).
    """
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{what} is lazy and not initialized: run a forward pass first")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(weight).__name__}")
    if weight.is_meta:
        raise ValueError(
            f"{what} is on the meta device and holds no values: materialize it first "
            "(to_empty, then load a state dict)"
        )
    kind = ops.tensor_kind(weight)
    if kind is not None:
        raise ValueError(f"{what} is {kind}; a dense (strided) weight is expected")
    if not weight.is_floating_point():
        raise TypeError(f"{what} must be a real floating-point tensor, got {weight.dtype}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        nan = int(torch.isnan(weight).sum())
        inf = weight.numel() - int(finite.sum()) - nan
        raise ValueError(
            f"{what} holds NaN or inf ({nan} NaN, {inf} inf of its {weight.numel()} entries); "
            "a factorization would make every output NaN: fix or re-initialize the weight first"
        )
    return weight


def _truncated_svd(
    weight: torch.Tensor, rank: int | None, energy: float | None, what: str = "argument 'weight'"
) -> tuple[int | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank, U, σ, V) of the float64 SVD of the 2-D `weight`, untruncated.

    The rank is `rank` as given (the module's constructor checks it), or the smallest holding
    `energy` of Σσ² (`energy_rank`), or full rank when neither is given. `weight` is checked
    first (`check_matrix`; errors start with `what`).
    """
    if rank is not None and energy is not None:
        raise ValueError("give at most one of the arguments 'rank' and 'energy'")
    check_matrix(weight, what)
    U, sigma, Vh = linalg.svd(weight.detach().double())
    if energy is not None:
        rank = energy_rank(sigma, energy)
    elif rank is None:
        rank = sigma.numel()
    return rank, U, sigma, Vh.mT


def factored_size(in_features: int, out_features: int, rank: int, core: str = "diag") -> int:
    """Numbers in U (out, r), S and V (in, r): r·(in + out) + r ("diag") or + r² ("full")."""
    return rank * (in_features + out_features) + (rank if _check_core(core) == "diag" else rank**2)


def break_even_rank(in_features: int, out_features: int, core: str = "diag") -> int:
    """The largest rank whose factorization holds no more numbers than the dense out×in W.

    ⌊in·out / (in + out + 1)⌋ for core="diag"; for "full" the largest r with
    r² + r·(in + out) ≤ in·out. 0 when no factorization is smaller (in or out of 1). Always
    below min(in, out).
    """
    dense = in_features * out_features
    total = in_features + out_features
    if _check_core(core) == "diag":
        return dense // (total + 1)
    rank = (math.isqrt(total * total + 4 * dense) - total) // 2
    while factored_size(in_features, out_features, rank + 1, core) <= dense:
        rank += 1  # isqrt rounds down: step to the exact integer answer
    while rank and factored_size(in_features, out_features, rank, core) > dense:
        rank -= 1
    return rank


class LargerThanDenseError(ValueError):
    """A factorization at the chosen rank would hold more numbers than the dense matrix.

    Raised by `from_linear`, `from_conv2d`, `from_multihead_attention` and `set_weight` without
    `allow_larger=True`; `lowrank_ext.convert` catches it and keeps that module dense.
    Attributes: rank, break_even, in_features, out_features, core, and part (the projection
    of an attention module, "" for a single layer).
    """

    def __init__(self, message: str, rank, break_even, in_features, out_features, core, part=""):
        super().__init__(message)
        self.rank = rank
        self.break_even = break_even
        self.in_features = in_features
        self.out_features = out_features
        self.core = core
        self.part = part

    def within(self, part: str, prefix: str) -> LargerThanDenseError:
        """The same error for the projection `part` of a larger module, message prefixed."""
        return LargerThanDenseError(
            f"{prefix}{self}",
            self.rank,
            self.break_even,
            self.in_features,
            self.out_features,
            self.core,
            part,
        )


def _check_allow_larger(allow_larger) -> bool:
    if not isinstance(allow_larger, bool):
        raise TypeError(f"argument 'allow_larger' must be a bool, got {allow_larger!r}")
    return allow_larger


def check_size(
    rank: int,
    in_features: int,
    out_features: int,
    core: str,
    allow_larger: bool,
    chosen_by: str,
) -> None:
    """LargerThanDenseError unless rank ≤ the break-even rank or `allow_larger`.

    `chosen_by` says where the rank came from, for the message ("rank=…", "energy=…", ...).
    """
    if _check_allow_larger(allow_larger):
        return
    rank = _check_rank(rank, in_features, out_features)
    dense = in_features * out_features
    size = factored_size(in_features, out_features, rank, core)
    if size <= dense:
        return
    even = break_even_rank(in_features, out_features, core)
    raise LargerThanDenseError(
        f"rank {rank} ({chosen_by}) holds {size} numbers in U, S, V (core={core!r}), more "
        f"than the {dense} of the dense {out_features}×{in_features} weight: the break-even "
        f"rank is {even}; pass allow_larger=True to factorize at rank {rank} anyway",
        rank,
        even,
        in_features,
        out_features,
        core,
    )


def chosen_by(rank, energy) -> str:
    """How the rank of a conversion was chosen, for messages."""
    if energy is not None:
        return f"chosen by energy={energy!r}"
    if rank is not None:
        return f"rank={rank!r}"
    return "full rank: neither rank nor energy given, an exact conversion"


def factorize(
    weight: torch.Tensor,
    rank: int | None,
    energy: float | None,
    core: str,
    allow_larger: bool,
    what: str = "argument 'weight'",
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_truncated_svd` of the 2-D `weight` (out, in), its rank checked against the module's
    limits and the break-even rank (`check_size`); what from_* and set_weight use. `what`
    names the weight in errors (see `check_matrix`)."""
    _check_allow_larger(allow_larger)
    _check_core(core)
    how = chosen_by(rank, energy)
    rank, U, sigma, V = _truncated_svd(weight, rank, energy, what)
    out_features, in_features = weight.shape
    check_size(rank, in_features, out_features, core, allow_larger, how)
    return rank, U, sigma, V
