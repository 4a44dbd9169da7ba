"""SVDs as accurate on a GPU as on the CPU.

torch.linalg.svd's default CUDA driver is cuSOLVER's Jacobi method (gesvdj), which stops short of
full float32 accuracy: on an H200 (torch 2.11.0+cu130, 2026-11-30) singular values of a 300×200
float32 matrix with σ ∈ [1, 2] came back up to 1.3e-4 off in relative terms, where float32
rounding allows about 1e-6. The QR-based driver gesvd is exact to rounding; every SVD that
lowrank_ext takes goes through here. CPU tensors use LAPACK's default unchanged.
"""

from __future__ import annotations

import torch


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, σ, Vᴴ) of `matrix` (..., m, n), as torch.linalg.svd(full_matrices=False).

    On CUDA the gesvd driver is used; it needs m ≥ n, so a wide matrix is decomposed through its
    transpose. σ is descending, of `matrix`'s real dtype.
    """
    if not matrix.is_cuda:
        return torch.linalg.svd(matrix, full_matrices=False)
    if matrix.shape[-2] < matrix.shape[-1]:
        U, sigma, Vh = torch.linalg.svd(matrix.mT, full_matrices=False, driver="gesvd")
        return Vh.mT, sigma, U.mT
    return torch.linalg.svd(matrix, full_matrices=False, driver="gesvd")


def svdvals(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of `matrix` (..., m, n), descending: torch.linalg.svdvals on the CPU,
    the gesvd driver on CUDA (see the module docstring)."""
    if not matrix.is_cuda:
        return torch.linalg.svdvals(matrix)
    return svd(matrix)[1]
