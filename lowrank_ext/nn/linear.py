"""LowRankLinear: a drop-in for nn.Linear (or transformers' Conv1D) whose weight lives only as
W = U S Vᵀ."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .factored import FactoredModule
from .hf_conv1d import conv1d_class, conv1d_matrix, is_conv1d
from .truncation import factorize

_DENSE_KINDS = ("linear", "conv1d")


class LowRankLinear(FactoredModule):
    """y = x Wᵀ + b with W = U S Vᵀ of rank r, computed as ((x V) Sᵀ) Uᵀ + b by the fused op.

    Args:
        in_features, out_features: as nn.Linear.
        rank: r, in [1, min(in_features, out_features)].
        bias: learn an additive bias, as nn.Linear.
        core: "diag" (S is a vector of r scales) or "full" (S is a trainable r×r matrix).

    Parameters U (out, r) and V (in, r) start orthonormal and S at √(out / (3r)), so that
    ‖W‖_F² = out/3 as for nn.Linear's default init and outputs have the same variance; the bias
    is initialized as nn.Linear's. The dense W is never formed in forward or backward; `.weight`
    builds it on demand for tools that read it.

    The constructor, the factors, their initialization, rank growth (`grow`, `freeze`) and the
    checkpoint layout (a state_dict saved at one rank loads into a module built at another) are
    those of `FactoredModule` (lowrank_ext/nn/factored.py), documented there.

    `dense_kind` names the dense class `lowrank_ext.merge` gives back: "linear" (nn.Linear, the
    class default) or "conv1d" (transformers' Conv1D, set by `from_conv1d`). It is a plain
    attribute: copy.deepcopy and pickling the module (torch.save of the model) keep it, the
    state_dict does not hold it (a module rebuilt by `lowrank_ext.convert` of the same model
    gets it again). `.weight` is (out_features, in_features) whatever the dense class.
    """

    dense_kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, S, V = self.factors()
        return ops.linear(x, U, S, V, self.bias)

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _repr_shape(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _repr_options(self) -> str:
        return "" if self.dense_kind == "linear" else f", dense_kind={self.dense_kind!r}"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
        allow_larger: bool = False,
    ) -> LowRankLinear:
        """Truncated SVD of linear.weight (in float64): exact at full rank to float tolerance.

        Give `rank`, or `energy` to keep the smallest rank holding that fraction of Σσ², or
        neither for full rank min(in, out) (an exact conversion, which needs allow_larger).

        Break-even rank: U (out, r), S and V (in, r) hold r·(in + out) + r numbers (core="diag";
        + r² for "full") against in·out in the dense weight, so the factorization is smaller
        only up to r = ⌊in·out / (in + out + 1)⌋ ("diag"; `lowrank_ext.nn.break_even_rank`),
        about half of min(in, out) for a square layer. A larger rank raises
        `LargerThanDenseError` (a ValueError naming the rank and the break-even rank) unless
        `allow_larger=True`.

        Returns a LowRankLinear with linear's dtype and device. Raises TypeError (not an
        nn.Linear, a weight that is not real floating point), ValueError (rank/energy out of
        range or both given, a rank above the break-even rank without allow_larger; a weight
        that is lazy, on the meta device, not dense, or holds NaN/inf, which the SVD would
        spread to every output). A zero weight has energy rank 1 (`energy_rank`).
        """
        if not isinstance(linear, nn.Linear):
            hint = " (use from_conv1d for a transformers Conv1D)" if is_conv1d(linear) else ""
            raise TypeError(
                f"argument 'linear' must be an nn.Linear, got {type(linear).__name__}{hint}"
            )
        weight = linear.weight
        what = "the weight of argument 'linear'"
        rank, U, sigma, V = factorize(weight, rank, energy, core, allow_larger, what)
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            core=core,
            device=weight.device,
            dtype=weight.dtype,
        )
        module._copy_svd(U, sigma, V, linear.bias)
        return module

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the same function."""
        weight = self.weight.detach()  # U may be None (a layer frozen at full rank)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        return self._copy_into_dense(linear, weight)

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
        allow_larger: bool = False,
    ) -> LowRankLinear:
        """Truncated SVD (in float64) of a transformers Conv1D(nf, nx)'s map y = x W + b.

        W is stored (nx, nf) = (in, out); the factorization is of the (out, in) matrix Wᵀ, so
        the result is a LowRankLinear(nx, nf) with the same function, exact at full rank to
        float tolerance, and `dense_kind="conv1d"` (merge gives back a Conv1D). Give `rank`, or
        `energy` to keep the smallest rank holding that fraction of Σσ², or neither for full
        rank min(nx, nf) (which needs allow_larger). A rank above the break-even rank (see
        from_linear) raises `LargerThanDenseError` unless `allow_larger=True`.

        Raises TypeError when `conv1d` is not a Conv1D or its weight not real floating point,
        ValueError when its weight is lazy, on the meta device, not 2-D or not (nx, nf), holds
        NaN/inf, or the rank is out of range or above the break-even rank.
        """
        if not is_conv1d(conv1d):
            raise TypeError(
                f"argument 'conv1d' must be a transformers Conv1D, got {type(conv1d).__name__}"
            )
        matrix = conv1d_matrix(conv1d, "argument 'conv1d'")
        what = "the weight of argument 'conv1d'"
        rank, U, sigma, V = factorize(matrix, rank, energy, core, allow_larger, what)
        module = cls(
            matrix.shape[1],
            matrix.shape[0],
            rank,
            bias=conv1d.bias is not None,
            core=core,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        module._copy_svd(U, sigma, V, conv1d.bias)
        module.dense_kind = "conv1d"
        return module

    def to_conv1d(self) -> nn.Module:
        """A dense transformers Conv1D(nf=out_features, nx=in_features) with the same function:
        its weight (in, out) is Wᵀ. Conv1D always adds a bias: a layer without one gets zeros.

        Raises ImportError when transformers is not installed.
        """
        conv1d_type = conv1d_class(load=True)
        if conv1d_type is None:
            raise ImportError(
                "LowRankLinear.to_conv1d needs transformers (pip install transformers)"
            )
        weight = self.weight.detach()
        with torch.device(weight.device):
            conv1d = conv1d_type(self.out_features, self.in_features).to(weight.dtype)
        return self._copy_into_dense(conv1d, weight.mT)

    def to_dense(self) -> nn.Module:
        """The dense module `merge` gives back: `to_conv1d()` for dense_kind "conv1d", else
        `to_linear()`."""
        if self.dense_kind not in _DENSE_KINDS:
            raise ValueError(
                f"LowRankLinear.dense_kind must be one of {_DENSE_KINDS}, got {self.dense_kind!r}"
            )
        return self.to_conv1d() if self.dense_kind == "conv1d" else self.to_linear()
