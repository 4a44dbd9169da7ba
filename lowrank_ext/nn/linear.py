"""LowRankLinear: a drop-in for nn.Linear whose weight lives only as W = U S Vᵀ."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .factored import FactoredModule
from .truncation import factorize


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
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, S, V = self.factors()
        return ops.linear(x, U, S, V, self.bias)

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _repr_shape(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

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
        nn.Linear), ValueError (rank/energy out of range or both given, a rank above the
        break-even rank without allow_larger).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        rank, U, sigma, V = factorize(weight, rank, energy, core, allow_larger)
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
