"""Truncation-aware whitening (SVD-LLM, Wang et al., arXiv:2403.07378, Sec. 3.1).

For a linear layer y = W x (W: out × in) and calibration inputs X (in × n) with second moment
C = X Xᵀ / n = L Lᵀ (Cholesky), the output error of an approximation W′ is

    ‖(W − W′) X‖_F² / n = tr((W − W′) C (W − W′)ᵀ) = ‖(W − W′) L‖_F².

So the best rank-r W′ for the calibration inputs is W′ = [W L]_r L⁻¹, with [·]_r the truncated
SVD P_r Σ_r Q_rᵀ of W L (Eckart–Young), and dropping the j-th component costs exactly σ_j² of
W L in mean squared output error per input row. The factors stored are orthonormal: with
B = L⁻ᵀ Q_r = Q_B R_B (QR) and the SVD Σ_r R_Bᵀ = A D Eᵀ of the small r × r middle,
W′ = (P_r A) D (Q_B E)ᵀ.

Regularization (rank-deficient or ill-conditioned C: dead inputs, fewer rows than inputs): the
Cholesky factor is taken of C + λ·mean(diag C)·I with λ = `ridge` (default 1e-6); if that fails
numerically λ grows tenfold until it succeeds. A larger ridge moves the result toward the plain
truncated SVD (λ → ∞ is plain truncation). The predicted errors are those of the regularized C.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import linalg

__all__ = ["WhitenedSVD", "output_error", "whitening_factor"]


def whitening_factor(
    second_moment: torch.Tensor, ridge: float = 1e-6
) -> tuple[torch.Tensor, float]:
    """(L, λ): the lower Cholesky factor of C + λ·mean(diag C)·I and the λ used.

    `second_moment` is C (in, in), symmetric positive semi-definite, float64. λ starts at
    `ridge` (≥ 0) and grows tenfold (from 1e-12 when 0) until the factorization succeeds; an
    all-zero C (a layer whose inputs were all zero) is factored as the identity.
    """
    C = second_moment.double()
    scale = C.diagonal().mean().item()
    if scale <= 0.0:
        scale = 1.0
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    lam = float(ridge)
    while True:
        L, info = torch.linalg.cholesky_ex(C + (lam * scale) * eye)
        if int(info) == 0:
            return L, lam
        lam = 1e-12 if lam == 0.0 else lam * 10.0
        if lam > 1e6:  # C is not a second moment at all (NaN, or far from symmetric PSD)
            raise ValueError("the second moment is not positive semi-definite (NaN or corrupted)")


def output_error(difference: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr(D C Dᵀ): the mean squared output error per input row of a weight error D (out, in)."""
    return float(((difference @ second_moment) * difference).sum())


class WhitenedSVD:
    """The whitened SVD of one layer's weight, truncated at any rank by `factors(rank)`.

    Args:
        matrix: W (out, in), any float dtype (computed in float64 on its device).
        second_moment: C = E[x xᵀ] (in, in) of the layer's calibration inputs, float64.
        ridge: λ of the regularization (module doc).
        on_fallback: called with the rank whenever `factors` returns the plain SVD's factors.

    Attributes: sigma (the singular values of W L, float64, descending: sigma[j]² is the mean
    squared output error of dropping component j), ridge (λ used), fallbacks (the ranks at which
    the plain truncated SVD was returned, see `factors`).
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        second_moment: torch.Tensor,
        ridge: float = 1e-6,
        on_fallback: Callable[[int], None] | None = None,
    ):
        self.weight = matrix.detach().double()
        self.second_moment = second_moment.to(self.weight.device, torch.float64)
        self.L, self.ridge = whitening_factor(self.second_moment, ridge)
        self.P, self.sigma, Qh = linalg.svd(self.weight @ self.L)
        self.Q = Qh.mT
        self._plain = None
        self.fallbacks: list[int] = []
        self._on_fallback = on_fallback

    def predicted_error(self, rank: int) -> float:
        """Σ_{j ≥ rank} σ_j²: the mean squared output error per row at `rank` (regularized C)."""
        return float((self.sigma[rank:] ** 2).sum())

    def whitened_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) of [W L]_r L⁻¹ with orthonormal U (out, r), V (in, r) (module doc)."""
        B = torch.linalg.solve_triangular(self.L.mT, self.Q[:, :rank], upper=True)
        Q_B, R_B = torch.linalg.qr(B)
        A, s, Eh = linalg.svd(self.sigma[:rank, None] * R_B.mT)
        return self.P[:, :rank] @ A, s, Q_B @ Eh.mT

    def plain_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) of the plain truncated SVD of W (minimizes ‖W − W′‖_F)."""
        if self._plain is None:
            U, s, Vh = linalg.svd(self.weight)
            self._plain = (U, s, Vh.mT)
        U, s, V = self._plain
        return U[:, :rank], s[:rank], V[:, :rank]

    def error(self, factors) -> float:
        """The mean squared output error per calibration row of U diag(s) Vᵀ (unregularized C)."""
        U, s, V = factors
        return output_error(self.weight - (U * s) @ V.mT, self.second_moment)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whitened rank-`rank` factors, or the plain truncated SVD's where those have the
        smaller output error on the calibration inputs (the rank is then added to
        `fallbacks`): the result is never worse than plain truncation on that data."""
        whitened = self.whitened_factors(rank)
        plain = self.plain_factors(rank)
        if self.error(whitened) > self.error(plain):
            self.fallbacks.append(rank)
            if self._on_fallback is not None:
                self._on_fallback(rank)
            return plain
        return whitened
