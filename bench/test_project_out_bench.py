"""pytest-benchmark suite for lowrank_ext.project_out (CGS2 with normalization).

    .venv/bin/python -m pytest bench/test_project_out_bench.py --benchmark-only

Implementations: the fused op; the same formula in eager PyTorch at the input's precision
(float32, which loses orthogonality near span(Q): see tests/test_project_out.py) and in float64
(the accurate eager alternative, casting in and out). Each is checked against float64 before it
is timed; on CUDA each timed call ends in torch.cuda.synchronize().
"""

from __future__ import annotations

import pytest
import torch

import lowrank_ext
from lowrank_ext import reference

SHAPES = [(4096, 256, 1), (4096, 256, 16), (16384, 64, 4)]  # (n, k, p)
DEVICES = ["cpu"] + (
    ["cuda"] if torch.cuda.is_available() and lowrank_ext.build_info()["cuda_kernels"] else []
)


def _eager_float64(Q, X):
    return reference.project_out(Q.double(), X.double(), 2, True).to(X.dtype)


IMPLS = {
    "fused": lambda Q, X: lowrank_ext.project_out(Q, X, 2, True),
    "eager_fp32": lambda Q, X: reference.project_out(Q, X, 2, True),
    "eager_fp64": _eager_float64,
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-k{}-p{}".format(*s))
@pytest.mark.parametrize("device", DEVICES)
def test_project_out(benchmark, device, shape, impl, backward):
    n, k, p = shape
    g = torch.Generator().manual_seed(0)
    Q64, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    X64 = torch.randn(n, p, dtype=torch.float64, generator=g)
    Q, X = Q64.float().to(device), X64.float().to(device)
    fn = IMPLS[impl]
    expected = reference.project_out(Q.double(), X.double(), 2, True)
    torch.testing.assert_close(fn(Q, X).double(), expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn(n, p, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        if backward:
            q, x = Q.detach().requires_grad_(), X.detach().requires_grad_()
            fn(q, x).backward(grad)
        else:
            with torch.no_grad():
                fn(Q, X)
        sync()

    benchmark.group = (
        f"project_out {device} float32 n{n} k{k} p{p} {'fwd+bwd' if backward else 'fwd'}"
    )
    benchmark.extra_info.update(impl=impl, n=n, k=k, p=p, backward=backward)
    benchmark.pedantic(timed, rounds=30, iterations=1, warmup_rounds=2)
