"""CUDA-only checks: both CUDA kernel sets, every SIMT tile height and the at::mm fallback,
run-to-run determinism, CUDA graphs, host threads, float16 range, streams, unwritten outputs,
64-bit indexing.

The float64-reference, gradcheck and opcheck tests of test_linear_op.py also run on CUDA.
tools/gpu_check.py runs this file (and every other "cuda" test) on a GPU machine.
"""

import contextlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, requires_cuda
from factors import as_float64, make_factors
from torch.library import opcheck

import lowrank_ext
from lowrank_ext import LowRankLinear, reference

pytestmark = [pytest.mark.cuda, requires_cuda]

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["cublas", "fused", "tensorcore"]
GRADS = ("x", "U", "S", "V", "bias")


def _require_tensorcore():
    """The tensorcore set needs a build with CUTLASS headers. tools/gpu_check.py builds with
    LOWRANK_EXT_REQUIRE_CUTLASS=1, under which its absence fails; elsewhere it skips, saying why."""
    if lowrank_ext.build_info()["tensorcore_kernels"]:
        return
    why = "this build has no tensor-core kernels (no CUTLASS headers at build time)"
    if os.environ.get("LOWRANK_EXT_REQUIRE_CUTLASS") == "1":
        pytest.fail(why + ", and LOWRANK_EXT_REQUIRE_CUTLASS=1")
    pytest.skip(why)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The test runs once with each CUDA kernel set of lowrank_ext.linear."""
    if not hasattr(lowrank_ext, "use_cuda_kernels"):
        pytest.fail("lowrank_ext.use_cuda_kernels is missing: issue 13's CUDA kernel switch")
    if request.param == "tensorcore":
        _require_tensorcore()
    with lowrank_ext.use_cuda_kernels(request.param):
        yield request.param


@pytest.fixture(scope="module")
def tile_map():
    """tools/cuda_reach.py: csrc/cuda/linear.cu's tile map in Python, and its checked cases."""
    spec = importlib.util.spec_from_file_location("cuda_reach", ROOT / "tools" / "cuda_reach.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _poison_cache(nbytes=1 << 28):
    # Freed blocks return to the caching allocator and back the op's outputs: an element the
    # kernel forgets to write then reads as NaN instead of a lucky zero.
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    torch.cuda.synchronize()


def _forward_backward(args, dy, linear=lowrank_ext.linear):
    """y and every gradient (None where an input is None) of one call on fresh leaves."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    y = linear(*leaves)
    y.backward(dy)
    return [y.detach()] + [None if leaf is None else leaf.grad for leaf in leaves]


def _assert_matches_float64(outputs, args, dy):
    """outputs (y and the gradients) against autograd of the plain formula in float64 on the CPU."""
    cpu = [None if t is None else t.cpu() for t in as_float64(*args)]
    expected = _forward_backward(cpu, dy.double().cpu(), linear=reference.linear)
    rtol, atol = TOLERANCES[args[0].dtype]
    for name, got, want in zip(("y",) + GRADS, outputs, expected):
        if want is None:
            assert got is None, name
            continue
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol, msg=name)


# ---- every SIMT tile height and the fallback -----------------------------------------------

# Issue 13's float32 ranks, and the two they miss on sm_90: BM=64 and the at::mm fallback (the
# smallest rank at which not even one row of t fits the device's opt-in shared memory).
TILE_RANKS = [64, 300, 1400, 4100, 20000, "fallback"]
# pick_tile_rows for float32 on an H100/H200 (227 KiB opt-in): 20000 is BM=1 above the 96 KiB
# soft budget; the fallback is r >= 49897. tools/gpu_check.py --dry-run prints the whole map.
SM90_TILE_ROWS = {64: 64, 300: 16, 1400: 4, 4100: 1, 20000: 1, "fallback": 0}


def _tile_rank(tile_map, r):
    optin, _ = tile_map.device_optin_smem(torch)
    return tile_map.fallback_rank(4, optin) if r == "fallback" else r


def test_tile_ranks_reach_every_simt_path(tile_map):
    optin, _ = tile_map.device_optin_smem(torch)
    rows = {r: tile_map.pick_tile_rows(_tile_rank(tile_map, r), 4, optin) for r in TILE_RANKS}
    assert set(rows.values()) == {64, 16, 4, 1, 0}, rows
    if optin == tile_map.SM90_OPTIN_SMEM:
        assert rows == SM90_TILE_ROWS


@pytest.mark.parametrize("backend", ["cublas", "fused"], indirect=True)  # float32: no tensorcore
@pytest.mark.parametrize(
    "r, core", [(r, "diag") for r in TILE_RANKS] + [(r, "full") for r in (64, 300, 1400, 4100)]
)
def test_every_tile_height_and_the_fallback(backend, tile_map, r, core):
    # cuda_reach's case: NaN-poisoned cache, forward and every gradient against float64 autograd
    # on the CPU, and (fused) the profiled kernel names must show the predicted tile height.
    optin, _ = tile_map.device_optin_smem(torch)
    rank = _tile_rank(tile_map, r)
    bm = tile_map.pick_tile_rows(rank, 4, optin)
    if optin == tile_map.SM90_OPTIN_SMEM:
        assert bm == SM90_TILE_ROWS[r]
    case = tile_map.tile_case(backend, "float32", rank, core, bm)
    tile_map.Runner(torch, lowrank_ext, seed=rank).run_linear(case)


# ---- determinism, CUDA graphs, host threads ------------------------------------------------


def _cublas_reproducible() -> bool:
    # torch.use_deterministic_algorithms accepts cuBLAS only with one of these workspace settings.
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


@contextlib.contextmanager
def _deterministic_algorithms(enabled):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [17, 300])
@pytest.mark.parametrize("core", ["diag", "full"])
def test_deterministic_run_to_run(backend, dtype, rank, core):
    """Three runs on one stream give bitwise equal y and gradients.

    The fused kernels sum in a fixed order with no atomics: bitwise equal always. cuBLAS gives
    bitwise equal results run to run for one toolkit, architecture and SM count, except in
    atomics mode and when a handle's workspace is shared across streams; torch vouches for it
    (use_deterministic_algorithms) only with CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8, which
    tools/gpu_check.py sets. There the cuBLAS path must be bitwise equal too (and use no op
    torch knows to be nondeterministic); without it, close to rounding.
    """
    args = make_factors((333,), 257, 129, rank, core=core, dtype=dtype, device="cuda")
    dy = torch.randn(333, 129, dtype=torch.float64).to("cuda", dtype)
    strict = backend == "fused" or _cublas_reproducible()
    with _deterministic_algorithms(_cublas_reproducible()):
        runs = [_forward_backward(args, dy) for _ in range(3)]
    rtol, atol = TOLERANCES[dtype]
    for later in runs[1:]:
        for name, a, b in zip(("y",) + GRADS, runs[0], later):
            if strict:
                assert torch.equal(a, b), f"{name} differs between runs"
            else:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("graph_rank, eager_rank", [(288, 32), (32, 288)])
def test_cuda_graph_replay_after_an_eager_call_at_another_rank(backend, graph_rank, eager_rank):
    """D1 of issue 13: the fused kernels' dynamic shared-memory limit is a process-wide attribute
    of each kernel. In float32 both ranks take BM=64 tiles, 89 KiB at r=288 and 25 KiB at r=32:
    a graph captured at one rank must still replay after an eager call at the other."""
    args = make_factors((67,), 48, 40, graph_rank, core="full", device="cuda", dtype=torch.float32)
    static = [t.detach().clone().requires_grad_() for t in args]
    static_dy = torch.randn(67, 40, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            for leaf in static:
                leaf.grad = None
            lowrank_ext.linear(*static).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in static:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lowrank_ext.linear(*static)
        static_y.backward(static_dy)

    eager = make_factors((67,), 48, 40, eager_rank, core="full", device="cuda", dtype=torch.float32)
    eager_dy = torch.randn(67, 40, device="cuda")
    _assert_matches_float64(_forward_backward(eager, eager_dy), eager, eager_dy)

    fresh = make_factors((67,), 48, 40, graph_rank, core="full", device="cuda", dtype=torch.float32)
    fresh_dy = torch.randn(67, 40, device="cuda")
    with torch.no_grad():
        for leaf, value in zip([*static, static_dy], [*fresh, fresh_dy]):
            leaf.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    got = [static_y.detach()] + [leaf.grad for leaf in static]
    _assert_matches_float64(got, fresh, fresh_dy)


def test_four_host_threads_at_once(backend):
    """Four host threads, each on its own stream, call the op at once at four ranks (float32
    BM=64 tiles with 25 to 89 KiB of shared memory: D1's process-wide attribute races)."""
    ranks = (32, 288, 64, 256)
    problems = [make_factors((67,), 48, 40, r, dtype=torch.float32, device="cuda") for r in ranks]
    dys = [torch.randn(67, 40, device="cuda") for _ in ranks]
    torch.cuda.synchronize()
    start = threading.Barrier(len(ranks))
    results, errors = [None] * len(ranks), []

    def work(i):
        try:
            stream = torch.cuda.Stream()
            start.wait(timeout=60)
            with torch.cuda.stream(stream):
                assert lowrank_ext.cuda_kernels() == backend  # the switch is process-wide
                for _ in range(20):
                    outputs = _forward_backward(problems[i], dys[i])
            stream.synchronize()
            results[i] = outputs
        except BaseException as exc:  # re-raised by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ranks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for outputs, args, dy in zip(results, problems, dys):
        _assert_matches_float64(outputs, args, dy)


# ---- float16 range and the saved t ---------------------------------------------------------


def test_float16_saved_t_cannot_overflow(backend):
    """D2 of issue 13: t = x V = 8 * 2 * 4096 = 65536 is past float16's 65504, y = t S U = 32768
    is not. Saved in float16, t would be inf and so would dU and dS."""
    half = {"dtype": torch.float16, "device": "cuda"}
    x = torch.full((1, 4096), 8.0, **half, requires_grad=True)
    V = torch.full((4096, 1), 2.0, **half, requires_grad=True)
    U = torch.ones(1, 1, **half, requires_grad=True)
    S = torch.full((1,), 0.5, **half, requires_grad=True)
    y = lowrank_ext.linear(x, U, S, V)
    y.backward(torch.full_like(y, 0.5))
    # dU = dy t S, dS = dy U t, dx = dy U S Vᵀ, dV = xᵀ dy U S: all exact in float16.
    for name, got, want in (
        ("y", y, 32768.0),
        ("dU", U.grad, 16384.0),
        ("dS", S.grad, 32768.0),
        ("dx", x.grad, 0.5),
        ("dV", V.grad, 2.0),
    ):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), torch.full_like(got, want).double(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_saved_t_is_float32_for_half_inputs(backend, dtype):
    x, U, S, V, b = make_factors((5, 3), 24, 16, 4, dtype=dtype, device="cuda")
    _, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    half = dtype in (torch.float16, torch.bfloat16)
    assert t.dtype == (torch.float32 if half else dtype)
    assert t.shape == (15, 4)
    rtol, atol = TOLERANCES[dtype]
    expected = x.reshape(15, 24).double() @ V.double()
    torch.testing.assert_close(t.double(), expected, rtol=rtol, atol=atol)


def test_opcheck_float16(backend):
    # The fake (meta) kernels must agree with the CUDA kernels, t's float32 dtype included.
    x, U, S, V, b = make_factors((3, 2), 6, 5, 3, dtype=torch.float16, device="cuda")
    for save_t in (True, False):
        opcheck(torch.ops.lowrank_ext.linear_forward, (x, U, S, V, b, save_t))
    _, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    dy = torch.randn(3, 2, 5, device="cuda").half()
    opcheck(torch.ops.lowrank_ext.linear_backward, (dy, x, t, U, S, V, [True] * 5))


# ---- streams, unwritten outputs, indexing --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("core", ["diag", "full"])
def test_every_output_element_is_written(backend, dtype, core):
    args = make_factors((333,), 257, 129, 17, core=core, dtype=dtype, device="cuda")
    leaves = [t.requires_grad_() for t in args]
    _poison_cache()
    y = lowrank_ext.linear(*leaves)
    _poison_cache()
    y.backward(torch.randn_like(y))
    for tensor in [y] + [leaf.grad for leaf in leaves]:
        assert torch.isfinite(tensor).all()


def test_runs_on_the_current_stream(backend):
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


def test_64_bit_indexing_past_2_to_the_31_elements(backend):
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


# ---- the tensor-core forward (csrc/cuda/linear_tensorcore.cu) ------------------------------------

TENSORCORE_KERNEL = "linear_forward_tc_kernel"
TENSORCORE_GRAD_KERNEL = "linear_grad_g_tc_kernel"  # the backward's first pass: g = dy U, dbias


@pytest.fixture
def tensorcore():
    _require_tensorcore()
    with lowrank_ext.use_cuda_kernels("tensorcore"):
        yield


def _cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if str(e.device_type).endswith("CUDA")}


# (batch shape, in, out, r): every padded rank (32, 64, 128, 256), 16-byte loads (in and r
# multiples of 8) and element loads, a partial last row block, outputs split over blocks, and
# several output tiles per block.
TENSORCORE_SHAPES = [
    ((67,), 48, 77, 16),
    ((67,), 45, 77, 17),
    ((3,), 64, 130, 40),
    ((2, 5), 50, 70, 100),
    ((130,), 32, 260, 256),
    ((1,), 40, 300, 24),
    ((4,), 3, 5, 1),
    ((4300,), 16, 300, 8),  # 68 row blocks, more than half of an H200's SMs: no split,
]  # so each block runs all three output tiles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch, n, m, r", TENSORCORE_SHAPES)
def test_tensorcore_matches_float64(tensorcore, dtype, core, bias, batch, n, m, r):
    args = make_factors(batch, n, m, r, core=core, bias=bias, dtype=dtype, device="cuda")
    dy = torch.randn(*batch, m, dtype=dtype, device="cuda")
    _poison_cache()
    _assert_matches_float64(_forward_backward(args, dy), args, dy)
    with torch.no_grad():  # the forward that saves no t
        y = lowrank_ext.linear(*args)
    rtol, atol = TOLERANCES[dtype]
    want = reference.linear(*[None if a is None else a.cpu() for a in as_float64(*args)])
    torch.testing.assert_close(y.double().cpu(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensorcore_empty_batch_and_non_contiguous_inputs(tensorcore, dtype):
    x, U, S, V, b = make_factors((0,), 48, 40, 16, dtype=dtype, device="cuda")
    y = lowrank_ext.linear(x, U, S, V, b)
    assert y.shape == (0, 40)
    x, U, S, V, b = make_factors((70,), 48, 40, 16, dtype=dtype, device="cuda")
    # x transposed, U and V column-major, S and bias strided: the op copies what it must.
    xt = x.t().contiguous().t()
    Ut, Vt = U.t().contiguous().t(), V.t().contiguous().t()
    S2 = torch.stack([S, S], 1)[:, 0]
    b2 = torch.stack([b, b], 1)[:, 1]
    assert not any(t.is_contiguous() for t in (xt, Ut, Vt, S2, b2))
    dy = torch.randn(70, 40, dtype=dtype, device="cuda")
    args = (xt, Ut, S2, Vt, b2)
    _assert_matches_float64(_forward_backward(args, dy), args, dy)


@pytest.mark.parametrize(
    "dtype, r, expected",
    [
        (torch.bfloat16, 16, True),
        (torch.float16, 256, True),
        (torch.bfloat16, 257, False),  # above the largest rank it takes: the composition
        (torch.float32, 16, False),  # float32 and float64: the composition
        (torch.float64, 16, False),
    ],
)
def test_tensorcore_kernel_runs_where_it_should(tensorcore, dtype, r, expected):
    args = make_factors((33,), 40, 24, r, dtype=dtype, device="cuda")
    names = _cuda_kernel_names(lambda: lowrank_ext.linear(*args))
    assert any(TENSORCORE_KERNEL in n for n in names) == expected, sorted(names)
    assert not any(TENSORCORE_GRAD_KERNEL in n for n in names), sorted(names)  # no backward
    x, U, S, V, b = (t.requires_grad_() for t in args)
    names = _cuda_kernel_names(lambda: lowrank_ext.linear(x, U, S, V, b).sum().backward())
    assert any(TENSORCORE_GRAD_KERNEL in n for n in names) == expected, sorted(names)
    U.grad = None
    with lowrank_ext.use_cuda_kernels("cublas"):  # the default never runs them
        names = _cuda_kernel_names(lambda: lowrank_ext.linear(x, U, S, V, b).sum().backward())
    assert not any("_tc_kernel" in n for n in names), sorted(names)


def test_tensorcore_backward_without_g_skips_the_first_pass(tensorcore):
    # Only dU and dbias asked for: no g = dy U is needed, dbias alone is a column sum.
    x, U, S, V, b = make_factors((70,), 64, 30, 24, dtype=torch.bfloat16, device="cuda")
    U.requires_grad_()
    b.requires_grad_()
    names = _cuda_kernel_names(lambda: lowrank_ext.linear(x, U, S, V, b).sum().backward())
    assert any(TENSORCORE_KERNEL in n for n in names), sorted(names)
    assert not any(TENSORCORE_GRAD_KERNEL in n for n in names), sorted(names)
    torch.testing.assert_close(b.grad.double(), torch.full((30,), 70.0, dtype=torch.float64))


def test_tensorcore_saved_t_is_the_float32_x_v(tensorcore):
    x, U, S, V, b = make_factors((70,), 64, 30, 24, dtype=torch.bfloat16, device="cuda")
    y, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    assert t.dtype == torch.float32 and t.shape == (70, 24)
    want = x.double() @ V.double()
    # bf16 products are exact in float32; 64 float32 additions (the tensor cores' may truncate)
    torch.testing.assert_close(t.double(), want, rtol=1e-4, atol=1e-4)
