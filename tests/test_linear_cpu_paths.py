"""The CPU kernels' code paths against float64: a single row (matrix-vector BLAS), vectors in
every position (rank 1, one input or output feature), one block on the calling thread, blocks
spread over threads, t recomputed in the backward, and work memory sized by the rows actually
processed (never by the rank alone)."""

import pytest
import torch
from factors import as_float64, make_factors

import lowrank_ext
from lowrank_ext import reference

SHAPES = [  # (batch, in, out, rank)
    (1, 33, 17, 5),  # one row: every product is a matrix-vector product
    (1, 33, 17, 1),
    # one row, sizes that end every loop of cpu/gemv.cpp off its step: rank past one column panel
    # (64 float32, 32 float64), in % 4 == 1, out % 4 == 3
    (1, 301, 203, 70),
    (1, 2048, 1100, 40),  # factors past 256 KiB: with 2 threads each product is split over them
    (5, 1, 7, 1),  # one input feature, rank 1: t and dU are columns
    (3, 9, 1, 2),  # one output feature
    (64, 20, 30, 4),  # exactly one forward block
    (65, 20, 30, 4),  # one more row than a block
    (700, 40, 24, 6),  # many blocks
    (300, 16, 12, 40),  # blocks of 160 (forward) and 320 (backward) rows
]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _assert_close_normwise(got, want, tol):
    # float32 sums over hundreds of rows: judged by the relative norm of the error, as a wrong
    # block, row or thread partial would make it O(1).
    err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert got.shape == want.shape and err <= tol, (tuple(got.shape), err)


def _leaves(args):
    return [None if t is None else t.detach().clone().requires_grad_() for t in args]


def _check_against_float64(leaves, args, dy):
    """y and every gradient of lowrank_ext.linear(*leaves) against the float64 reference on
    `args` (the same values)."""
    wanted = [t for t in leaves if t is not None]
    y = lowrank_ext.linear(*leaves)
    grads = torch.autograd.grad(y, wanted, dy)
    ref_leaves = _leaves(as_float64(*args))
    y_ref = reference.linear(*ref_leaves)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], dy.double())
    _assert_close_normwise(y, y_ref, 1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_close_normwise(got, want, 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-in{}-out{}-r{}".format(*s))
@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_float64(shape, core, bias, threads):
    B, n, m, r = shape
    gen = torch.Generator().manual_seed(B * 1000 + n + m + r)
    args = make_factors((B,), n, m, r, core=core, bias=bias, dtype=torch.float32, generator=gen)
    dy = torch.randn(B, m, generator=gen)
    _check_against_float64(_leaves(args), args, dy)


@pytest.mark.parametrize("shape", [(1, 33, 17, 5), (700, 40, 24, 6)])
@pytest.mark.parametrize("core", ["diag", "full"])
def test_backward_recomputes_t_when_it_was_not_saved(shape, core, threads):
    B, n, m, r = shape
    gen = torch.Generator().manual_seed(7)
    x, U, S, V, _ = make_factors((B,), n, m, r, core=core, dtype=torch.float64, generator=gen)
    dy = torch.randn(B, m, dtype=torch.float64, generator=gen)
    backward = torch.ops.lowrank_ext.linear_backward
    for mask in ([False, True, True, False, False], [True] * 5, [False, False, False, True, True]):
        with_t = backward(dy, x, x @ V, U, S, V, mask)
        without_t = backward(dy, x, torch.empty(0, dtype=x.dtype), U, S, V, mask)
        for a, b, wanted in zip(with_t, without_t, mask, strict=True):
            assert (a.numel() > 0 or a.shape == (0,)) == (wanted or a.shape == (0,))
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 301, 203, 70), (1, 4096, 4096, 16), (2, 130, 67, 33)])
@pytest.mark.parametrize("core", ["diag", "full"])
def test_float64_one_row_matches_the_reference_to_rounding(shape, core, threads):
    # float64 through the same loops (their float64 copies), against the unfused formula
    B, n, m, r = shape
    gen = torch.Generator().manual_seed(n + r)
    args = make_factors((B,), n, m, r, core=core, bias=True, dtype=torch.float64, generator=gen)
    leaves, ref_leaves = _leaves(args), _leaves(args)
    dy = torch.randn(B, m, dtype=torch.float64, generator=gen)
    y, y_ref = lowrank_ext.linear(*leaves), reference.linear(*ref_leaves)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y, leaves, dy)
    for got, want in zip(grads, torch.autograd.grad(y_ref, ref_leaves, dy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_huge_rank_small_batch_sizes_work_memory_by_rows():
    # Issue 13 (D10): work buffers were sized max(64, 8r) x r whatever the batch, so this call
    # tried to allocate 57-115 GB. Now they follow the 70 rows: a few tens of MB.
    B, n, m, r = 70, 45, 77, 60000
    gen = torch.Generator().manual_seed(3)
    args = make_factors((B,), n, m, r, dtype=torch.float32, generator=gen)
    _check_against_float64(_leaves(args), args, torch.randn(B, m, generator=gen))


@pytest.mark.parametrize(
    "shape",
    [(1, 12, 10, 3), (1, 301, 203, 70), (1, 2048, 1100, 40), (300, 16, 12, 5), (5, 1, 7, 1)],
)
@pytest.mark.parametrize("core", ["diag", "full"])
def test_factors_in_transposed_storage_are_read_in_place(shape, core, threads):
    # torch.linalg.qr/svd return column-major factors; the kernels read them through BLAS's
    # transpose flags instead of copying them on every call. Same values, same answer.
    B, n, m, r = shape
    gen = torch.Generator().manual_seed(11)
    args = make_factors((B,), n, m, r, core=core, dtype=torch.float32, generator=gen)
    x, U, S, V, b = args

    def transposed_storage(t):
        return t.t().contiguous().t() if t.dim() == 2 else t

    moved = [x, transposed_storage(U), transposed_storage(S), transposed_storage(V), b]
    assert all(m.equal(a) for m, a in zip(moved, args, strict=True))
    leaves = _leaves(moved)
    for leaf, arg in zip(leaves[1:4], moved[1:4], strict=True):
        leaf.data = arg  # keep the column-major strides on the leaves
    if r > 1:
        assert not leaves[1].is_contiguous() and not leaves[3].is_contiguous()
    _check_against_float64(leaves, args, torch.randn(B, m, generator=gen))
