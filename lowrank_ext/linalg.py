"""SVDs as accurate on a GPU as on the CPU.

torch.linalg.svd's default CUDA driver is cuSOLVER's Jacobi method (gesvdj), which stops short of
full float32 accuracy: on an H200 (torch 2.11.0+cu130, 2026-11-30) the singular values of planted
float32 matrices came back up to 7.7e-5 (300×200) and 1.5e-4 (1024×768) off, relative to σ_max,
against 5e-7 and 1.5e-6 with the QR-based driver gesvd (which took 1.25 s against 0.97 s for a
4096² matrix; gesvda failed to converge on the same matrices). Every SVD that lowrank_ext takes
goes through here. CPU tensors use LAPACK's default unchanged.
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
