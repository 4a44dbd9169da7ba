"""Large CPU outputs (y, dx, project_out's Y and dX) come from 2 MiB-aligned memory advised for
transparent huge pages (csrc/cpu/output_alloc.h): values against float64, the alignment and the
kernel's advice flag on that memory, storage that still resizes and frees, small outputs left to
torch's allocator, and LOWRANK_EXT_HUGEPAGES=0 turning it off in a fresh process."""

import os
import subprocess
import sys

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


def _big_problem(dtype=torch.float32, rank=8):
    # y and x are 160 × 4096 float32 = 2.5 MiB: past the threshold.
    g = torch.Generator().manual_seed(0)
    return make_factors((160,), 4096, 4096, rank, dtype=dtype, generator=g)


def _relerr(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux only (cpu_hugepages is False)")
def test_on_by_default_on_linux():
    assert lowrank_ext.build_info()["cpu_hugepages"] is True
    assert lowrank_ext.ops.cpu_hugepages() is True


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_outputs_are_aligned_advised_and_correct(dtype):
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
        if os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
            assert "hg" in _vm_flags(big.data_ptr()), "MADV_HUGEPAGE not applied"


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux only")
def test_project_out_large_outputs():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(4096, 6, dtype=torch.float64, generator=g))[0]
    X = torch.randn(4096, 160, dtype=torch.float64, generator=g)  # 5 MiB
    Xl = X.clone().requires_grad_()
    Y = lowrank_ext.project_out(Q, Xl)
    want = X - Q @ (Q.T @ X)  # Q orthonormal: one exact projection
    assert _relerr(Y, want) < 1e-12
    assert Y.data_ptr() % HUGE == 0
    (dX,) = torch.autograd.grad(Y, Xl, torch.ones_like(Y))
    assert dX.data_ptr() % HUGE == 0
    assert torch.isfinite(dX).all()


def test_small_outputs_use_torchs_allocator():
    x, U, S, V, b = make_factors((4,), 64, 32, 4, dtype=torch.float32)
    y = lowrank_ext.linear(x, U, S, V, b)
    assert y.nbytes < HUGE
    assert _relerr(y, reference.linear(*as_float64(x, U, S, V, b))) < 1e-5


def test_large_output_storage_resizes_and_is_written_in_place():
    x, U, S, V, b = _big_problem()
    with torch.no_grad():
        y = lowrank_ext.linear(x, U, S, V, b)
    before = y.clone()
    y.resize_(2 * y.shape[0], y.shape[1])  # the storage grows through the same allocator
    assert torch.equal(y[: before.shape[0]], before)
    y.add_(1.0)
    assert torch.equal(y[: before.shape[0]], before + 1.0)
    del y  # freed through the allocator's deleter (a wrong one crashes here)
    torch.testing.assert_close(lowrank_ext.linear(x, U, S, V, b), before, rtol=0, atol=0)


def test_environment_switch_turns_it_off():
    code = (
        "import torch, lowrank_ext\n"
        "from lowrank_ext import reference\n"
        "f = dict(dtype=torch.float64)\n"
        "x = torch.randn(160, 4096, **f); U = torch.randn(4096, 8, **f)\n"
        "V = torch.randn(4096, 8, **f); S = torch.rand(8, **f)\n"
        "y = lowrank_ext.linear(x, U, S, V)\n"
        "torch.testing.assert_close(y, reference.linear(x, U, S, V))\n"
        "print(lowrank_ext.build_info()['cpu_hugepages'])\n"
    )
    env = {**os.environ, "LOWRANK_EXT_HUGEPAGES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux only")
def test_saved_t_is_large_output_too():
    # t = x V is 8192 × 80 float32 = 2.5 MiB; y (8192 × 16) is small here
    x, U, S, V, b = make_factors((8192,), 16, 16, 80, dtype=torch.float32)
    y, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    assert t.data_ptr() % HUGE == 0
    assert _relerr(t, x.double() @ V.double()) < 1e-6
    assert _relerr(y, reference.linear(*as_float64(x, U, S, V, b))) < 1e-5


def test_large_output_works_with_torch_storage_operations(tmp_path):
    """share_memory_ (the memory moves into a shared segment; ours is freed by its deleter),
    torch.save/load, numpy views and storage resize to 0 behave as for any CPU tensor."""
    x, U, S, V, b = _big_problem()
    with torch.no_grad():
        y = lowrank_ext.linear(x, U, S, V, b)
    want = y.clone()
    assert torch.equal(torch.from_numpy(y.numpy()), want)
    torch.save(y, tmp_path / "y.pt")
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)
    y.share_memory_()
    assert y.is_shared() and torch.equal(y, want)
    z = lowrank_ext.linear(x, U, S, V, b).detach()
    z.untyped_storage().resize_(0)
    assert z.untyped_storage().nbytes() == 0
