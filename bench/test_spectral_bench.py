"""pytest-benchmark: spectral analysis of a factored layer vs a dense SVD, 4096×4096, r = 64, fp32.

    .venv/bin/python -m pytest bench/test_spectral_bench.py --benchmark-only

The factored path (QR of U and V, SVD of the r×r core: O((N+M)·r²)) against the dense paths on
the same W = U S Vᵀ: `spectral.analyze` of the dense matrix (its float64 SVD) and a bare
`torch.linalg.svdvals` in float32 (the cheapest dense SVD there is). A dense SVD at this size
takes minutes on a small CPU, so each dense benchmark runs one round; the dense analysis also
checks that the factored singular values and ranks equal the dense ones.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_ext import LowRankLinear, spectral

SIZE, RANK = 4096, 64
GROUP = f"spectral-{SIZE}x{SIZE}-r{RANK}-fp32"


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    module = LowRankLinear(SIZE, SIZE, rank=RANK, dtype=torch.float32)
    with torch.no_grad():
        module.S.mul_(torch.logspace(0, -2, RANK))  # a spread spectrum, not r equal values
    return module


@pytest.fixture(scope="module")
def dense_weight(layer):
    return layer.weight.detach()


@pytest.mark.benchmark(group=GROUP)
def test_factored_analysis(benchmark, layer):
    report = benchmark(spectral.analyze, layer)
    assert report[0].hard_rank == RANK


@pytest.mark.benchmark(group=GROUP)
def test_dense_analysis_float64_svd(benchmark, layer, dense_weight):
    dense = benchmark.pedantic(spectral.analyze, args=(dense_weight,), rounds=1, iterations=1)[0]
    factored = spectral.analyze(layer)[0]
    torch.testing.assert_close(
        factored.singular_values[:RANK], dense.singular_values[:RANK], rtol=1e-5, atol=1e-6
    )
    assert factored.hard_rank == dense.hard_rank == RANK
    assert factored.numerical_rank == dense.numerical_rank == RANK


@pytest.mark.benchmark(group=GROUP)
def test_dense_svdvals_float32(benchmark, dense_weight):
    sigma = benchmark.pedantic(torch.linalg.svdvals, args=(dense_weight,), rounds=1, iterations=1)
    assert sigma.shape == (SIZE,)
