"""lowrank_ext.linear: gradients, op registration and agreement with the float64 reference."""

import itertools

import pytest
import torch
from conftest import DEVICES, DTYPES, TOLERANCES
from factors import as_float64, make_factors
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import lowrank_ext
from lowrank_ext import reference

CORES = ["diag", "full"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_subset_of_inputs(device, core, bias):
    inputs = make_factors((2, 3), 5, 4, 3, core=core, bias=bias, device=device)
    names = [i for i, t in enumerate(inputs) if t is not None]
    for count in range(1, len(names) + 1):
        for subset in itertools.combinations(names, count):
            args = [
                None if t is None else t.detach().clone().requires_grad_(i in subset)
                for i, t in enumerate(inputs)
            ]
            assert torch.autograd.gradcheck(lowrank_ext.linear, args), subset


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
def test_gradgradcheck(device, core):
    args = [t.requires_grad_() for t in make_factors((3,), 4, 5, 2, core=core, device=device)]
    assert torch.autograd.gradgradcheck(lowrank_ext.linear, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, core, bias):
    x, U, S, V, b = make_factors((3, 2), 6, 5, 3, core=core, bias=bias, device=device)
    params = [t.requires_grad_() for t in (U, S, V) + ((b,) if bias else ())]
    assert all(p.requires_grad for p in params)
    for save_t in (True, False):
        opcheck(torch.ops.lowrank_ext.linear_forward, (x, U, S, V, b, save_t))
    opcheck(torch.ops.lowrank_ext.linear, (x, U, S, V, b))
    dy = torch.randn(3, 2, 5, dtype=x.dtype, device=device)
    t = x.reshape(-1, 6) @ V.detach()
    for mask in ([True] * 5, [True, False, True, False, bias], [False, True, False, True, False]):
        opcheck(
            torch.ops.lowrank_ext.linear_backward,
            (dy, x, t, U.detach(), S.detach(), V.detach(), mask),
        )


def _check_against_float64(args, dtype):
    """Fused forward and backward in `dtype` against the float64 reference on the same values."""
    x, U, S, V, b = args
    leaves = [None if t is None else t.detach().requires_grad_() for t in args]
    y = lowrank_ext.linear(*leaves)
    ref_leaves = [None if t is None else t.requires_grad_() for t in as_float64(*leaves)]
    y_ref = reference.linear(*ref_leaves)
    rtol, atol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    if y.numel() == 0 and x.shape[-1] == 0:
        return
    dy = torch.randn(y.shape, dtype=torch.float64, device=y.device)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    scale = max(1.0, float(x.shape[:-1].numel()) ** 0.5)  # gradients of U, S, V sum over the batch
    for leaf, ref in zip(leaves, ref_leaves):
        if leaf is not None:
            assert leaf.grad is not None and leaf.grad.dtype == dtype
            torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=rtol, atol=atol * scale)


def _strided(t, how):
    """The same values as t in a non-contiguous layout."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@pytest.mark.parametrize("device", DEVICES)
@given(
    data=st.data(),
    batch_shape=st.lists(st.integers(0, 9), min_size=0, max_size=2).map(tuple),
    in_features=st.integers(1, 70),
    out_features=st.integers(1, 70),
    core=st.sampled_from(CORES),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
)
def test_fused_matches_float64_reference(
    device, data, batch_shape, in_features, out_features, core, bias, layout
):
    # Ranks: 1, prime, and up to min(in, out): none is a multiple of a tile.
    rank = data.draw(st.integers(1, min(in_features, out_features)), label="rank")
    dtype = data.draw(st.sampled_from(DTYPES[device]), label="dtype")
    rows = data.draw(st.integers(1, 130), label="leading rows")  # a 1st dim to cross row blocks
    shape = (rows, *batch_shape)
    args = make_factors(
        shape, in_features, out_features, rank, core=core, bias=bias, dtype=dtype, device=device
    )
    args = [None if t is None else _strided(t, layout) for t in args]
    _check_against_float64(args, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
def test_empty_batch(device, core):
    x, U, S, V, b = (
        t.requires_grad_() for t in make_factors((0, 3), 7, 5, 2, core=core, device=device)
    )
    y = lowrank_ext.linear(x, U, S, V, b)
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (U, S, V, b):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_across_many_blocks_and_threads(device):
    # Large enough that the CPU kernel splits the batch across threads and row blocks.
    args = make_factors((1037,), 300, 200, 37, dtype=torch.float32, device=device)
    _check_against_float64(args, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x, U, S, V, b = make_factors((4,), 6, 5, 3, device=device)
    t = x @ V
    dy = torch.randn(4, 5, dtype=x.dtype, device=device)
    grads = torch.ops.lowrank_ext.linear_backward(
        dy, x, t, U, S, V, [False, True, False, False, False]
    )
    assert [g.numel() for g in grads] == [0, U.numel(), 0, 0, 0]
    U64 = U.detach().requires_grad_()
    reference.linear(x, U64, S, V).backward(dy)
    torch.testing.assert_close(grads[1], U64.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_recomputes_unsaved_t(device):
    # t empty: the kernel must recompute x V rather than read garbage.
    x, U, S, V, b = make_factors((4,), 6, 5, 3, device=device)
    dy = torch.randn(4, 5, dtype=x.dtype, device=device)
    empty = x.new_empty((0,))
    with_t = torch.ops.lowrank_ext.linear_backward(dy, x, x @ V, U, S, V, [True] * 5)
    without_t = torch.ops.lowrank_ext.linear_backward(dy, x, empty, U, S, V, [True] * 5)
    for a, c in zip(with_t, without_t):
        torch.testing.assert_close(a, c)


def test_t_is_saved_only_when_a_gradient_needs_it():
    x, U, S, V, b = make_factors((4,), 6, 5, 3)
    _, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, False)
    assert t.shape == (0,)
    _, t = torch.ops.lowrank_ext.linear_forward(x, U, S, V, b, True)
    torch.testing.assert_close(t, x @ V)


def test_autocast_cpu_computes_in_float32():
    x, U, S, V, b = make_factors((8,), 16, 12, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_ext.linear(x.bfloat16(), U, S, V, b)
    assert y.dtype == torch.float32
    expected = reference.linear(*as_float64(x.bfloat16().float(), U, S, V, b))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_deterministic_run_to_run():
    args = make_factors((517,), 64, 48, 7, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in args]
    results = []
    for _ in range(2):
        for leaf in leaves:
            leaf.grad = None
        y = lowrank_ext.linear(*leaves)
        y.square().sum().backward()
        results.append([y.detach().clone()] + [leaf.grad.clone() for leaf in leaves])
    for a, c in zip(*results):
        assert torch.equal(a, c)


def _column_major(t):
    return t.t().contiguous().t() if t.dim() == 2 else t.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("batch", [0, 1, 37, 700])
@pytest.mark.parametrize("column_major", ["none", "U", "V", "all"])
def test_factor_gradients_take_the_factors_layout(device, core, batch, column_major):
    # torch.linalg.qr/svd return column-major factors. Their gradients come back column-major,
    # as ATen's mm gradients do, so that AccumulateGrad takes them as they are instead of
    # copying them into the parameter's layout on every backward.
    x, U, S, V, b = make_factors((batch,), 40, 24, 6, core=core, device=device)
    chosen = {"none": (), "U": ("U",), "V": ("V",), "all": ("U", "S", "V")}[column_major]
    factors = {"U": U, "S": S, "V": V}
    leaves = {
        k: (_column_major(f) if k in chosen else f.clone()).requires_grad_()
        for k, f in factors.items()
    }
    bias = b.clone().requires_grad_()
    dy = torch.randn(batch, 24, dtype=x.dtype, device=device)
    lowrank_ext.linear(x, leaves["U"], leaves["S"], leaves["V"], bias).backward(dy)
    ref = {k: f.double().requires_grad_() for k, f in factors.items()}
    reference.linear(x.double(), ref["U"], ref["S"], ref["V"], b.double()).backward(dy.double())
    rtol, atol = TOLERANCES[x.dtype]
    for k, leaf in leaves.items():
        assert leaf.grad.stride() == leaf.stride(), (k, leaf.grad.stride(), leaf.stride())
        torch.testing.assert_close(leaf.grad.double(), ref[k].grad, rtol=rtol, atol=atol * 30)
    # The fake (meta) kernel gives the same strides as the real one: compile and export see them.
    t = x @ V
    args = (dy, x, t, leaves["U"].detach(), leaves["S"].detach(), leaves["V"].detach(), [True] * 5)
    opcheck(torch.ops.lowrank_ext.linear_backward, args)
