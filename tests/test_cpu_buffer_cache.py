"""The CPU kernels' cache of large buffers (csrc/cpu/output_alloc.h): outputs of 256 KiB and
more (y, the saved t, dx, dU, dV, project_out's Y and dX) against float64; 2 MiB alignment and
huge-page advice from 2 MiB; a freed buffer handed out again (never with stale values); the
byte limit and eviction; LOWRANK_EXT_CPU_CACHE_MB (0 and bad values); resize, storage
operations, threads and fork."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from factors import as_float64, make_factors

import lowrank_ext
from lowrank_ext import reference

HUGE = 2 << 20
LINUX = sys.platform.startswith("linux")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (Linux /proc)."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                current = lo <= address < hi
            elif head == "VmFlags:" and current:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _big_problem(dtype=torch.float32, rank=8, seed=0):
    # y and x are 160 × 4096 float32 = 2.5 MiB: past the 2 MiB threshold (rounded to 4 MiB).
    g = torch.Generator().manual_seed(seed)
    return make_factors((160,), 4096, 4096, rank, dtype=dtype, generator=g)


def _relerr(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _run_python(code: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def empty_cache():
    lowrank_ext.empty_cpu_buffer_cache()
    yield
    lowrank_ext.empty_cpu_buffer_cache()


def test_default_limit():
    # read at import; the suite does not set LOWRANK_EXT_CPU_CACHE_MB
    assert "LOWRANK_EXT_CPU_CACHE_MB" not in os.environ
    assert lowrank_ext.cpu_buffer_cache()["limit_bytes"] == 256 << 20
    assert lowrank_ext.build_info()["cpu_buffer_cache_mb"] == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_outputs_are_correct_aligned_and_advised(dtype, empty_cache):
    # rank 160: U, V and so dU, dV are 4096 × 160 (2.5 MiB in float32), t 160 × 160 is small
    x, U, S, V, b = _big_problem(dtype, rank=160)
    leaves = [t.clone().requires_grad_() for t in (x, U, S, V, b)]
    y = lowrank_ext.linear(*leaves)
    dy = torch.randn_like(y)
    dx, dU, dS, dV, db = torch.autograd.grad(y, leaves, dy)

    ref = [t.clone().requires_grad_() for t in as_float64(x, U, S, V, b)]
    y_ref = reference.linear(*ref)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip((y, dx, dU, dS, dV, db), (y_ref, *grads_ref), strict=True):
        assert _relerr(got, want) < tol
    for big in (y, dx, dU, dV):
        assert big.nbytes >= HUGE and big.is_contiguous()
        assert big.data_ptr() % HUGE == 0
        if LINUX and os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
            assert "hg" in _vm_flags(big.data_ptr()), "MADV_HUGEPAGE not applied"


def test_saved_t_comes_from_the_cache(empty_cache):
    # t = x V is 8192 × 80 float32 = 2.5 MiB; y (8192 × 16) is small here
    x, U, S, V, b = make_factors((8192,), 16, 16, 80, dtype=torch.float32)
    y, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    assert t.data_ptr() % HUGE == 0
    assert _relerr(t, x.double() @ V.double()) < 1e-6
    assert _relerr(y, reference.linear(*as_float64(x, U, S, V, b))) < 1e-5


def test_project_out_large_outputs(empty_cache):
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(4096, 6, dtype=torch.float64, generator=g))[0]
    X = torch.randn(4096, 160, dtype=torch.float64, generator=g)  # 5 MiB
    Xl = X.clone().requires_grad_()
    Y = lowrank_ext.project_out(Q, Xl)
    assert _relerr(Y, X - Q @ (Q.T @ X)) < 1e-12  # Q orthonormal: one exact projection
    G = torch.randn_like(Y)
    (dX,) = torch.autograd.grad(Y, Xl, G)
    assert _relerr(dX, G - Q @ (Q.T @ G)) < 1e-12  # the projector is symmetric
    assert Y.data_ptr() % HUGE == 0 and dX.data_ptr() % HUGE == 0


def test_freed_buffer_is_reused_with_fresh_values(empty_cache):
    x1, U1, S1, V1, b1 = _big_problem(seed=0)
    x2, U2, S2, V2, b2 = _big_problem(seed=1)
    with torch.no_grad():
        y1 = lowrank_ext.linear(x1, U1, S1, V1, b1)
        address, before = y1.data_ptr(), lowrank_ext.cpu_buffer_cache()
        del y1
        kept = lowrank_ext.cpu_buffer_cache()
        assert kept["cached_bytes"] == before["cached_bytes"] + (4 << 20)  # 2.5 MiB rounded
        y2 = lowrank_ext.linear(x2, U2, S2, V2, b2)
    after = lowrank_ext.cpu_buffer_cache()
    assert y2.data_ptr() == address and after["hits"] == kept["hits"] + 1
    assert after["cached_bytes"] == before["cached_bytes"]
    assert _relerr(y2, reference.linear(*as_float64(x2, U2, S2, V2, b2))) < 1e-5


def test_mid_size_gradients_are_cached_at_page_alignment(empty_cache):
    # B = 1, 4096 wide, r = 64: dU and dV are 1 MiB (under 2 MiB: 64 KiB granules, no huge pages)
    x, U, S, V, b = make_factors((1,), 4096, 4096, 64, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, U, S, V, b)]
    dy = torch.randn(1, 4096)
    _, dU, _, dV, _ = torch.autograd.grad(lowrank_ext.linear(*leaves), leaves, dy)
    addresses = {dU.data_ptr(), dV.data_ptr()}
    assert all(a % 4096 == 0 for a in addresses)
    before = lowrank_ext.cpu_buffer_cache()
    del dU, dV
    assert lowrank_ext.cpu_buffer_cache()["cached_bytes"] == before["cached_bytes"] + (2 << 20)
    grads = torch.autograd.grad(lowrank_ext.linear(*leaves), leaves, dy)
    assert {grads[1].data_ptr(), grads[3].data_ptr()} == addresses
    ref = [t.clone().requires_grad_() for t in as_float64(x, U, S, V, b)]
    want = torch.autograd.grad(reference.linear(*ref), ref, dy.double())
    for got, w in zip(grads, want, strict=True):
        assert _relerr(got, w) < 1e-5


def test_small_outputs_bypass_the_cache(empty_cache):
    x, U, S, V, b = make_factors((4,), 64, 32, 4, dtype=torch.float32)
    before = lowrank_ext.cpu_buffer_cache()
    y = lowrank_ext.linear(x, U, S, V, b)
    del y
    after = lowrank_ext.cpu_buffer_cache()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (
        before["hits"],
        before["misses"],
        0,
    )


def test_empty_cache_frees_everything(empty_cache):
    x, U, S, V, b = _big_problem()
    with torch.no_grad():
        ys = [lowrank_ext.linear(x, U, S, V, b) for _ in range(3)]
    del ys
    assert lowrank_ext.cpu_buffer_cache()["cached_bytes"] == 3 * (4 << 20)
    lowrank_ext.empty_cpu_buffer_cache()
    assert lowrank_ext.cpu_buffer_cache()["cached_bytes"] == 0


def test_limit_evicts_the_oldest_and_zero_keeps_nothing():
    code = """
        import torch, lowrank_ext
        x = torch.randn(160, 4096); U = torch.randn(4096, 8); V = torch.randn(4096, 8)
        S = torch.rand(8)
        with torch.no_grad():
            y1 = lowrank_ext.linear(x, U, S, V); y2 = lowrank_ext.linear(x, U, S, V)
        p1, p2 = y1.data_ptr(), y2.data_ptr()
        del y1
        a = lowrank_ext.cpu_buffer_cache()["cached_bytes"]
        del y2  # 4 + 4 MiB > 6: y1's block goes, y2's is kept
        b = lowrank_ext.cpu_buffer_cache()["cached_bytes"]
        with torch.no_grad():
            y3 = lowrank_ext.linear(x, U, S, V)
        limit = lowrank_ext.cpu_buffer_cache()["limit_bytes"]
        # 9 MiB > the limit: torch's allocator serves it, the cache never counts it
        before = lowrank_ext.cpu_buffer_cache()
        with torch.no_grad():
            big = lowrank_ext.linear(torch.randn(576, 4096), U, S, V)
        del big
        after = lowrank_ext.cpu_buffer_cache()
        keys = ("hits", "misses", "cached_bytes")
        untouched = all(after[k] == before[k] for k in keys)
        print(a >> 20, b >> 20, y3.data_ptr() == p2, limit >> 20, untouched)
    """
    out = _run_python(code, LOWRANK_EXT_CPU_CACHE_MB="6")
    a_mb, b_mb, reused, limit, untouched = out.split()
    assert (int(a_mb), int(b_mb), reused, int(limit), untouched) == (4, 4, "True", 6, "True")
    code0 = """
        import torch, lowrank_ext
        from lowrank_ext import reference
        f = dict(dtype=torch.float64)
        x = torch.randn(160, 4096, **f); U = torch.randn(4096, 8, **f)
        V = torch.randn(4096, 8, **f); S = torch.rand(8, **f)
        y = lowrank_ext.linear(x, U, S, V)
        torch.testing.assert_close(y, reference.linear(x, U, S, V))
        del y
        info = lowrank_ext.build_info()
        stats = lowrank_ext.cpu_buffer_cache()  # off: torch's allocator, never counted here
        print(stats["cached_bytes"], stats["misses"], info["cpu_buffer_cache_mb"])
    """
    assert _run_python(code0, LOWRANK_EXT_CPU_CACHE_MB="0") == "0 0 0"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "12MB"])
def test_bad_limit_fails_the_import_naming_the_variable(value):
    out = subprocess.run(
        [sys.executable, "-c", "import lowrank_ext"],
        env={**os.environ, "LOWRANK_EXT_CPU_CACHE_MB": value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert (
        f"ValueError: LOWRANK_EXT_CPU_CACHE_MB must be a whole number of MiB >= 0, got '{value}'"
        in out.stderr
    )


def test_resize_and_storage_operations(tmp_path, empty_cache):
    """resize_ (through the same allocator), share_memory_ (the memory moves into a shared
    segment, ours goes back to the cache), torch.save/load, numpy views, storage resize to 0."""
    x, U, S, V, b = _big_problem()
    with torch.no_grad():
        y = lowrank_ext.linear(x, U, S, V, b)
    want = y.clone()
    y.resize_(2 * y.shape[0], y.shape[1])
    assert torch.equal(y[: want.shape[0]], want)
    y = y[: want.shape[0]].clone()
    assert torch.equal(torch.from_numpy(y.numpy()), want)
    torch.save(y, tmp_path / "y.pt")
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)
    with torch.no_grad():
        z = lowrank_ext.linear(x, U, S, V, b)
    z.share_memory_()
    assert z.is_shared() and torch.equal(z, want)
    with torch.no_grad():
        w = lowrank_ext.linear(x, U, S, V, b)
    w.untyped_storage().resize_(0)
    assert w.untyped_storage().nbytes() == 0
    with torch.no_grad():
        torch.testing.assert_close(lowrank_ext.linear(x, U, S, V, b), want, rtol=0, atol=0)


def test_threads_share_the_cache(empty_cache):
    problems = [_big_problem(seed=s) for s in range(4)]
    wants = [reference.linear(*as_float64(*p)) for p in problems]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                with torch.no_grad():
                    y = lowrank_ext.linear(*problems[i])
                assert _relerr(y, wants[i]) < 1e-5
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert lowrank_ext.cpu_buffer_cache()["hits"] > 0


def _child(queue):
    # as DataLoader workers do: OpenMP's pool does not survive fork (plain torch.mm hangs too)
    torch.set_num_threads(1)
    x, U, S, V, b = _big_problem(seed=3)
    with torch.no_grad():
        y = lowrank_ext.linear(x, U, S, V, b)
    queue.put(_relerr(y, reference.linear(*as_float64(x, U, S, V, b))))


@pytest.mark.skipif(not LINUX, reason="fork start method")
def test_forked_child_uses_its_copy_of_the_cache(empty_cache):
    x, U, S, V, b = _big_problem()
    with torch.no_grad():
        y = lowrank_ext.linear(x, U, S, V, b)
    del y  # a block is cached when the child forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue,))
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 0
    assert queue.get(timeout=10) < 1e-5
