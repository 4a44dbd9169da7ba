"""CUDA-only checks: streams, CUDA graphs, unwritten outputs, 64-bit indexing.

The float64-reference, gradcheck and opcheck tests of test_linear_op.py also run on CUDA.
"""

import pytest
import torch
from conftest import requires_cuda
from factors import as_float64, make_factors

import lowrank_ext
from lowrank_ext import LowRankLinear, reference

pytestmark = [pytest.mark.cuda, requires_cuda]


def _poison_cache(nbytes=1 << 28):
    # Freed blocks return to the caching allocator and back the op's outputs: an element the
    # kernel forgets to write then reads as NaN instead of a lucky zero.
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("core", ["diag", "full"])
def test_every_output_element_is_written(dtype, core):
    args = make_factors((333,), 257, 129, 17, core=core, dtype=dtype, device="cuda")
    leaves = [t.requires_grad_() for t in args]
    _poison_cache()
    y = lowrank_ext.linear(*leaves)
    _poison_cache()
    y.backward(torch.randn_like(y))
    for tensor in [y] + [leaf.grad for leaf in leaves]:
        assert torch.isfinite(tensor).all()


def test_runs_on_the_current_stream():
    args = make_factors((512,), 256, 192, 16, dtype=torch.float32, device="cuda")
    expected = lowrank_ext.linear(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            got = lowrank_ext.linear(*args)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


def test_compile_reduce_overhead_cuda_graphs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LowRankLinear(64, 48, 8), torch.nn.ReLU(), LowRankLinear(48, 16, 4, core="full")
    ).cuda()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(3):  # record, then replay the graph
        y = compiled(x)
    torch.testing.assert_close(y, model(x))


def test_other_device_index_is_guarded():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices to check the device guard")
    args = make_factors((64,), 32, 16, 4, dtype=torch.float32, device="cuda:1")
    y = lowrank_ext.linear(*args)
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y.double(), reference.linear(*as_float64(*args)))


def test_64_bit_indexing_past_2_to_the_31_elements():
    # x and dx hold 2**31 + 2**12 elements: 32-bit offsets would wrap.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    rows, n = 2**20 + 2, 2**11
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    U, S, V = (t.cuda().bfloat16() for t in make_factors((1,), n, 8, 4)[1:4])
    x.requires_grad_()
    y = lowrank_ext.linear(x, U, S, V)
    y.backward(torch.ones_like(y))
    for row in (0, rows // 2, rows - 1):  # the last rows live past 2**31 elements
        ref = reference.linear(*as_float64(x[row : row + 1], U, S, V))
        torch.testing.assert_close(y[row : row + 1].double(), ref, rtol=4e-2, atol=8e-2)
        dx_ref = (
            torch.ones(1, 8, dtype=torch.float64, device="cuda") @ (U.double() * S.double())
        ) @ V.double().T
        torch.testing.assert_close(x.grad[row : row + 1].double(), dx_ref, rtol=4e-2, atol=8e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_casts_to_the_autocast_dtype(dtype):
    args = make_factors((64,), 48, 32, 8, dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = lowrank_ext.linear(*args)
    assert y.dtype == dtype
    expected = reference.linear(*as_float64(*(t.to(dtype) for t in args)))
    torch.testing.assert_close(y.double(), expected, rtol=4e-2, atol=8e-2)


# ---- project_out ---------------------------------------------------------------------------


def _basis_and_columns(n, k, p, dtype=torch.float32):
    q, _ = torch.linalg.qr(torch.randn(n, k + p, dtype=torch.float64))
    X = q[:, k:] + q[:, :k] @ torch.randn(k, p, dtype=torch.float64)
    return q[:, :k].to("cuda", dtype), X.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_out_every_output_element_is_written(dtype):
    Q, X = _basis_and_columns(1031, 70, 3, dtype)
    Q.requires_grad_()
    X.requires_grad_()
    _poison_cache()
    Y = lowrank_ext.project_out(Q, X, normalize=True)
    _poison_cache()
    Y.backward(torch.randn_like(Y))
    for tensor in (Y, Q.grad, X.grad):
        assert torch.isfinite(tensor).all()


def test_project_out_matches_cpu_kernel_and_is_reproducible():
    Q, X = _basis_and_columns(5000, 300, 5, torch.float64)
    cuda = lowrank_ext.project_out(Q, X, normalize=True)
    assert torch.equal(lowrank_ext.project_out(Q, X, normalize=True), cuda)  # fixed sum order
    torch.testing.assert_close(
        cuda.cpu(),
        lowrank_ext.project_out(Q.cpu(), X.cpu(), normalize=True),
        rtol=1e-12,
        atol=1e-12,
    )


def test_project_out_ignores_tf32():
    Q, X = _basis_and_columns(2048, 128, 2)
    exact = lowrank_ext.project_out(Q, X, normalize=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # the autouse fixture restores it
    assert torch.equal(lowrank_ext.project_out(Q, X, normalize=True), exact)


def test_project_out_on_a_side_stream_and_in_a_cuda_graph():
    Q, X = _basis_and_columns(777, 33, 2)
    expected = lowrank_ext.project_out(Q, X, normalize=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lowrank_ext.project_out(Q, X, normalize=True)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = lowrank_ext.project_out(Q, X, normalize=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


def test_project_out_64_bit_indexing():
    # Q holds 2**31 + 2**20 elements: 32-bit offsets into it would wrap.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    n, k = 2**23 + 2**12, 256
    Q = torch.zeros(n, k, device="cuda")
    Q[-k:] = torch.eye(k, device="cuda")  # the basis lives in the last rows
    X = torch.ones(n, 1, device="cuda")
    Y = lowrank_ext.project_out(Q, X)
    assert Y[:-k].eq(1).all() and Y[-k:].abs().max() == 0
