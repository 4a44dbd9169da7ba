"""lowrank_ext.linalg: the SVD every part of the package takes (gesvd on CUDA)."""

import pytest
import torch
from conftest import DEVICES

from lowrank_ext import linalg


def planted(rows, cols, rank, dtype, device, *batch):
    """A rank-`rank` matrix with σ evenly in [1, 2], and those σ (float64, descending)."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    left, _ = torch.linalg.qr(torch.randn(*batch, rows, rank, dtype=torch.float64, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(*batch, cols, rank, dtype=torch.float64, generator=gen))
    sigma = torch.linspace(2.0, 1.0, rank, dtype=torch.float64).expand(*batch, rank)
    matrix = (left * sigma.unsqueeze(-2)) @ right.mT
    return matrix.to(device=device, dtype=dtype), sigma


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (64, 64), (7, 1), (1, 7)])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_svd_reconstructs_and_matches_the_true_sigma(device, dtype, shape, batch):
    rows, cols = shape
    rank = max(min(shape) // 10, 1)
    matrix, sigma = planted(rows, cols, rank, dtype, device, *batch)
    U, s, Vh = linalg.svd(matrix)
    k = min(shape)
    assert U.shape == (*batch, rows, k) and s.shape == (*batch, k) and Vh.shape == (*batch, k, cols)
    assert s.dtype == dtype and s.device == matrix.device
    # float32 rounding of the matrix allows ~1e-6 relative to σ_max; gesvdj gave 1e-4 on CUDA
    tol = 5e-6 if dtype == torch.float32 else 1e-12
    expected = torch.zeros(*batch, k, dtype=torch.float64)
    expected[..., :rank] = sigma
    assert (s.double().cpu() - expected).abs().max() <= tol * 2
    assert torch.all(s[..., :-1] >= s[..., 1:])  # descending
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.double().mT @ U.double() - eye).abs().max().cpu() <= tol * 20
    assert (Vh.double() @ Vh.double().mT - eye).abs().max().cpu() <= tol * 20
    rebuilt = (U.double() * s.double().unsqueeze(-2)) @ Vh.double()
    assert (rebuilt - matrix.double()).abs().max().cpu() <= tol * 20
    vals = linalg.svdvals(matrix)
    torch.testing.assert_close(vals, s, rtol=0, atol=tol * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty(device, shape):
    U, s, Vh = linalg.svd(torch.zeros(shape, device=device))
    assert U.shape == (shape[0], 0) and s.shape == (0,) and Vh.shape == (0, shape[1])
