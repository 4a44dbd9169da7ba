"""lowrank_ext.project_out: agreement with float64, accuracy near span(Q), gradients, errors."""

import itertools

import pytest
import torch
from conftest import DEVICES
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import lowrank_ext
from lowrank_ext import reference

OP_DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def orthonormal(n, k, *, dtype=torch.float64, device="cpu", seed=0):
    """(n, k) with orthonormal columns: the Q of a float64 QR, then cast."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))
    return q.to(device=device, dtype=dtype)


def random(*shape, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", OP_DTYPES)
@given(
    n=st.integers(0, 70),
    k_fraction=st.floats(0, 0.9),
    p=st.integers(0, 5),
    passes=st.integers(1, 3),
    normalize=st.booleans(),
    transposed=st.booleans(),
)
def test_matches_float64_reference(device, dtype, n, k_fraction, p, passes, normalize, transposed):
    k = int(k_fraction * n)
    if normalize and (n == 0 or k == n) and p > 0:
        return  # every column is in span(Q): the refusal has its own test
    if normalize and passes == 1:
        return  # refused (normalize needs two passes): tests/test_op_limits.py
    Q = orthonormal(n, k, dtype=dtype, device=device)
    # Non-contiguous X half the time: the kernels must read strides correctly.
    X = (
        random(p, n, dtype=dtype, device=device).T
        if transposed
        else random(n, p, dtype=dtype, device=device)
    )
    Y = lowrank_ext.project_out(Q, X, passes=passes, normalize=normalize)
    expected = reference.project_out(Q.double(), X.double(), passes, normalize)
    assert Y.dtype == dtype and Y.shape == (n, p)
    torch.testing.assert_close(Y.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_near_span_accuracy_float32(device):
    # The bar: X at distance 1e-6 from span(Q), n=4096, k=256, float32.
    n, k, p = 4096, 256, 4
    Q64 = orthonormal(n, k + p, seed=3)
    Q, outside = Q64[:, :k], Q64[:, k:]
    inside = random(k, p, seed=4)
    X64 = Q @ (inside / inside.norm(dim=0)) + 1e-6 * outside  # ‖x‖ ≈ 1, distance 1e-6
    Q32, X32 = Q.float().to(device), X64.float().to(device)

    def leakage(passes, normalize=True):
        Y = lowrank_ext.project_out(Q32, X32, passes=passes, normalize=normalize).double().cpu()
        if normalize:
            torch.testing.assert_close(Y.norm(dim=0), torch.ones(p, dtype=torch.float64))
        return ((Q32.double().cpu().T @ Y).abs().max(0).values / Y.norm(dim=0)).max().item()

    assert leakage(2) <= 2e-7
    # One classical Gram–Schmidt pass leaves most of the rounding error of the first
    # subtraction in span(Q); the second pass is what removes it (and normalize needs it).
    assert leakage(1, normalize=False) > 1e-3


def test_result_ignores_reduced_precision_matmul_settings():
    Q, X = orthonormal(512, 64, dtype=torch.float32), random(512, 3, dtype=torch.float32)
    exact = lowrank_ext.project_out(Q, X, normalize=True)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # lets BLAS backends use bf16/TF32
        assert torch.equal(lowrank_ext.project_out(Q, X, normalize=True), exact)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_bitwise_identical_for_any_thread_count():
    # Above the size (2^22 multiply-adds a sweep) from which the CPU kernel goes parallel.
    Q, X = orthonormal(20000, 80), random(20000, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lowrank_ext.project_out(Q, X, normalize=True)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(lowrank_ext.project_out(Q, X, normalize=True), single)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "passes, normalize", [(1, False), (2, False), (3, False), (2, True), (3, True)]
)
def test_gradcheck_every_subset(device, passes, normalize):
    Q, X = orthonormal(7, 3, device=device), random(7, 2, device=device)
    for wanted in ([True, False], [False, True], [True, True]):
        args = (Q.clone().requires_grad_(wanted[0]), X.clone().requires_grad_(wanted[1]))
        assert torch.autograd.gradcheck(
            lambda q, x: lowrank_ext.project_out(q, x, passes, normalize), args
        ), wanted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_gradgradcheck(device, normalize):
    args = (
        orthonormal(6, 2, device=device).requires_grad_(),
        random(6, 2, device=device).requires_grad_(),
    )
    assert torch.autograd.gradgradcheck(
        lambda q, x: lowrank_ext.project_out(q, x, 2, normalize), args
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck(device, normalize):
    Q = orthonormal(9, 3, device=device).requires_grad_()
    X = random(9, 2, device=device).requires_grad_()
    for passes in (2, 3) if normalize else (1, 2):
        opcheck(torch.ops.lowrank_ext.project_out_forward, (Q, X, passes, normalize))
        opcheck(torch.ops.lowrank_ext.project_out, (Q, X, passes, normalize))
        Y, coeffs, norms = torch.ops.lowrank_ext.project_out_forward(
            Q.detach(), X.detach(), passes, normalize
        )
        dY = random(9, 2, device=device, seed=5)
        for mask in itertools.product([True, False], repeat=2):
            opcheck(
                torch.ops.lowrank_ext.project_out_backward,
                (dY, Q.detach(), X.detach(), Y, coeffs, norms, passes, normalize, list(mask)),
            )


def test_gradient_matches_float64_autograd_of_reference_float32():
    Q, X = orthonormal(300, 20, dtype=torch.float32), random(300, 3, dtype=torch.float32)
    dY = random(300, 3, dtype=torch.float32, seed=7)
    Qg, Xg = Q.clone().requires_grad_(), X.clone().requires_grad_()
    lowrank_ext.project_out(Qg, Xg, normalize=True).backward(dY)
    Q64, X64 = Q.double().requires_grad_(), X.double().requires_grad_()
    reference.project_out(Q64, X64, 2, True).backward(dY.double())
    torch.testing.assert_close(Qg.grad.double(), Q64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(Xg.grad.double(), X64.grad, rtol=1e-4, atol=1e-5)


def test_empty_basis_returns_x():
    X = random(5, 2)
    assert torch.equal(lowrank_ext.project_out(torch.empty(5, 0, dtype=X.dtype), X), X)
    torch.testing.assert_close(
        lowrank_ext.project_out(torch.empty(5, 0, dtype=X.dtype), X, normalize=True),
        X / X.norm(dim=0),
    )


def test_compile_fullgraph_forward_and_backward():
    Q, X = orthonormal(16, 4), random(16, 3)

    def step(q, x):
        return (lowrank_ext.project_out(q, x, normalize=True) ** 3).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        q, x = Q.clone().requires_grad_(), X.clone().requires_grad_()
        loss = fn(q, x)
        loss.backward()
        results.append((loss.detach(), q.grad, x.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)


def test_autocast_cpu_computes_in_float32():
    Q, X = orthonormal(32, 4, dtype=torch.bfloat16), random(32, 2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y = lowrank_ext.project_out(Q, X)
    assert Y.dtype == torch.float32
    torch.testing.assert_close(
        Y.double(), reference.project_out(Q.double(), X.double()), rtol=1e-5, atol=1e-5
    )


# ---- refusals: each names the argument -------------------------------------------------------


def test_column_in_span_refused_when_normalizing():
    Q = orthonormal(64, 8, dtype=torch.float32)
    X = torch.cat([random(64, 1, dtype=torch.float32), Q @ random(8, 1, dtype=torch.float32)], 1)
    with pytest.raises(
        RuntimeError, match=r"column 1 of argument 'X' is zero or lies in span\(Q\)"
    ):
        lowrank_ext.project_out(Q, X, normalize=True)
    # Without normalization the (tiny) residual is a valid answer.
    assert lowrank_ext.project_out(Q, X)[:, 1].norm() < 1e-5


def test_zero_column_refused_when_normalizing():
    X = torch.zeros(10, 2, dtype=torch.float64)
    X[:, 0] = 1
    with pytest.raises(RuntimeError, match="column 1 of argument 'X' is zero"):
        lowrank_ext.project_out(orthonormal(10, 2), X, normalize=True)


def test_non_finite_column():
    X = random(10, 2)
    X[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="column 0 of argument 'X' has a non-finite norm"):
        lowrank_ext.project_out(orthonormal(10, 2), X, normalize=True)
    # NaN propagates (and only into its own column) without normalization.
    Y = lowrank_ext.project_out(orthonormal(10, 2), X)
    assert Y[:, 0].isnan().all() and Y[:, 1].isfinite().all()


@pytest.mark.parametrize(
    "Q, X, passes, match",
    [
        (torch.eye(4)[:, :2], torch.ones(4), 2, "argument 'X' must be 2-D"),
        (torch.ones(4), torch.ones(4, 1), 2, "argument 'Q' must be 2-D"),
        (torch.eye(4)[:, :2], torch.ones(5, 1), 2, r"argument 'Q' has shape \[4, 2\]"),
        (torch.eye(4)[:, :2].half(), torch.ones(4, 1).half(), 2, "argument 'X' has dtype Half"),
        (torch.eye(4)[:, :2], torch.ones(4, 1).double(), 2, "argument 'Q' has dtype Float"),
        (torch.eye(4)[:, :2], torch.ones(4, 1), 0, r"argument 'passes' must be in \[1, 8\]"),
    ],
)
def test_bad_input_names_the_argument(Q, X, passes, match):
    with pytest.raises(RuntimeError, match=match):
        lowrank_ext.project_out(Q, X, passes=passes)
