"""LowRankConv2d against nn.Conv2d / F.conv2d with the rebuilt kernel."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowrank_ext import reference
from lowrank_ext.nn import LowRankConv2d

F64 = torch.float64


def _dense_twin(layer: LowRankConv2d) -> nn.Conv2d:
    """nn.Conv2d with the same hyperparameters and the kernel U S Vᵀ rebuilt in the test."""
    U, S, V = (t.detach() for t in (layer.U, layer.S, layer.V))
    W = (U * S) @ V.T if S.dim() == 1 else U @ S @ V.T
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        dtype=F64,
    )
    with torch.no_grad():
        conv.weight.copy_(W.reshape(conv.weight.shape))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


@st.composite
def conv_cases(draw):
    in_channels = draw(st.integers(1, 4))
    out_channels = draw(st.integers(1, 5))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(
        st.one_of(
            st.sampled_from(["same", "valid"]),
            st.integers(0, 2),
            st.tuples(st.integers(0, 2), st.integers(0, 1)),
        )
    )
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    limit = min(out_channels, in_channels * kernel[0] * kernel[1])
    rank = draw(st.integers(1, limit))
    core = draw(st.sampled_from(["diag", "full"]))
    bias = draw(st.booleans())
    batch = draw(st.integers(0, 2))
    # reflect needs padding < the input size; 6 rows and columns cover every padding drawn.
    height, width = draw(st.integers(6, 9)), draw(st.integers(6, 9))
    return (
        dict(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel,
            rank=rank,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
            padding_mode=padding_mode,
            core=core,
        ),
        (batch, in_channels, height, width),
        draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@given(conv_cases())
def test_matches_conv2d_with_the_rebuilt_kernel(case):
    kwargs, input_shape, seed = case
    g = torch.Generator().manual_seed(seed)
    layer = LowRankConv2d(**kwargs, dtype=F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=g))
    x = torch.randn(input_shape, dtype=F64, generator=g)
    expected = _dense_twin(layer)(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_same_padding_with_even_kernel_pads_one_more_on_the_right(padding_mode):
    # An even kernel extent d·(k-1) is odd: the only case where left and right padding differ.
    torch.manual_seed(0)
    layer = LowRankConv2d(2, 3, (2, 4), 2, padding="same", padding_mode=padding_mode, dtype=F64)
    x = torch.randn(1, 2, 7, 8, dtype=F64)
    torch.testing.assert_close(layer(x), _dense_twin(layer)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 2e-5)])
def test_from_conv2d_at_full_rank_is_exact(core, dtype, tol):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 7, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), dtype=dtype)
    layer = LowRankConv2d.from_conv2d(conv, core=core, allow_larger=True)
    assert layer.rank == 7 and layer.core == core
    x = torch.randn(2, 3, 10, 9, dtype=dtype)
    torch.testing.assert_close(layer(x), conv(x), rtol=tol, atol=tol)
    torch.testing.assert_close(layer.weight.detach(), conv.weight, rtol=tol, atol=tol)
    dense = layer.to_conv2d()
    assert type(dense) is nn.Conv2d and dense.stride == (2, 1) and dense.dilation == (1, 2)
    torch.testing.assert_close(dense(x), conv(x), rtol=tol, atol=tol)
    # Unbatched input, as nn.Conv2d accepts it.
    torch.testing.assert_close(layer(x[0]), conv(x[0]), rtol=tol, atol=tol)


def test_truncation_is_the_best_approximation_of_the_reshaped_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", dtype=F64)
    sigma = torch.linalg.svdvals(conv.weight.detach().reshape(6, -1))
    for k in (1, 3, 5):
        layer = LowRankConv2d.from_conv2d(conv, rank=k)
        error = torch.linalg.vector_norm(layer.weight - conv.weight) ** 2
        assert error.item() == pytest.approx((sigma[k:] ** 2).sum().item(), rel=1e-10)
        assert layer.padding == "same" and layer.padding_mode == "reflect"
    # energy: the smallest rank whose σ² hold that fraction of the total.
    fraction = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    expected = int((fraction < 0.8).sum()) + 1
    assert LowRankConv2d.from_conv2d(conv, energy=0.8).rank == expected


@pytest.mark.parametrize("core", ["diag", "full"])
def test_gradcheck(core):
    torch.manual_seed(0)
    layer = LowRankConv2d(
        2, 3, (2, 3), 2, stride=(2, 1), padding=(1, 0), dilation=(1, 2), core=core
    )
    layer = layer.double()
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x = torch.randn(2, 2, 5, 6, dtype=F64, requires_grad=True)

    def run(x, U, S, V, bias):
        return torch.func.functional_call(layer, {"U": U, "S": S, "V": V, "bias": bias}, (x,))

    args = (x, params["U"], params["S"], params["V"], params["bias"])
    assert torch.autograd.gradcheck(run, args)


def test_init_matches_conv2d_kernel_norm_and_bias_bound():
    torch.manual_seed(0)
    layer = LowRankConv2d(8, 16, 3, 4)
    norm2 = torch.linalg.vector_norm(layer.weight.detach()).item() ** 2
    assert norm2 == pytest.approx(16 / 3, rel=1e-5)
    # nn.Conv2d's default kernel has E‖K‖² = out/3 too; its bias is U(±1/√(in·kh·kw)).
    dense = torch.stack(
        [torch.linalg.vector_norm(nn.Conv2d(8, 16, 3).weight) ** 2 for _ in range(50)]
    )
    assert dense.mean().item() == pytest.approx(16 / 3, rel=0.05)
    assert layer.bias.abs().max().item() <= 1 / (8 * 9) ** 0.5
    identity = torch.eye(4)
    torch.testing.assert_close(layer.V.T @ layer.V, identity, atol=1e-6, rtol=0)


def test_state_dict_holds_the_rank_in_shapes_and_loads_at_another_rank():
    torch.manual_seed(0)
    saved = LowRankConv2d(3, 6, 3, 2, padding=1, core="full")
    state = saved.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "U": (6, 2),
        "S": (2, 2),
        "V": (27, 2),
        "bias": (6,),
    }
    other = LowRankConv2d(3, 6, 3, 5, padding=1, core="full")
    other.load_state_dict(state)
    assert other.rank == 2 and other.S.shape == (2, 2)
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(other(x), saved(x))
    with pytest.raises(RuntimeError, match=r"size mismatch for V: .*\(27, 2\).* \(18, 2\)"):
        LowRankConv2d(2, 6, 3, 2, core="full").load_state_dict(state)
    with pytest.raises(RuntimeError, match="checkpoint has core='full' but the module has"):
        LowRankConv2d(3, 6, 3, 2).load_state_dict(state)


def test_grow_keeps_the_function_and_the_conv_equivalence():
    torch.manual_seed(0)
    layer = LowRankConv2d(3, 6, 3, 2, padding=1, dtype=F64)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    before = layer(x)
    layer.grow(2)
    assert (layer.frozen_rank, layer.rank) == (2, 4)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.S.copy_(torch.randn(4, dtype=F64))
        layer.U.add_(torch.randn_like(layer.U))
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))
    restored = LowRankConv2d(3, 6, 3, 1, padding=1, dtype=F64)
    restored.load_state_dict(layer.state_dict())
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_forward_and_backward_never_build_the_dense_kernel(monkeypatch):
    layer = LowRankConv2d(3, 5, 3, 2, padding=1)
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)

    def forbidden(*args):
        raise AssertionError("dense kernel was built")

    monkeypatch.setattr(reference, "dense_weight", forbidden)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, expected)
    assert layer.U.grad is not None and layer.V.grad is not None


def test_repr_names_the_conv_and_the_rank():
    layer = LowRankConv2d(3, 5, 3, 2, stride=2, padding="valid", padding_mode="circular")
    assert repr(layer) == (
        "LowRankConv2d(3, 5, kernel_size=(3, 3), rank=2, stride=(2, 2), padding='valid', "
        "dilation=(1, 1), padding_mode='circular', core='diag', bias=True)"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(groups=3), "argument 'groups' must be 1, got 3"),
        (dict(padding="same", stride=2), "'same' is not supported with stride != 1"),
        (dict(padding="full"), "argument 'padding' must be 'same', 'valid'"),
        (dict(padding=-1), "argument 'padding' must be an int >= 0"),
        (dict(kernel_size=(3, 0)), "argument 'kernel_size' must be an int >= 1"),
        (dict(rank=10), r"argument 'rank' must be an int in .* = \[1, 6\], got 10"),
        (dict(padding_mode="mirror"), "argument 'padding_mode' must be one of"),
        (dict(core="dense"), "argument 'core' must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    arguments = dict(in_channels=3, out_channels=6, kernel_size=3, rank=2) | kwargs
    with pytest.raises(ValueError, match=match):
        LowRankConv2d(**arguments)


def test_bad_inputs_and_sources_raise_clear_errors():
    layer = LowRankConv2d(3, 6, 3, 2)
    with pytest.raises(
        ValueError, match=r"argument 'input' must be \(N, 3, H, W\).*\(2, 4, 8, 8\)"
    ):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="argument 'conv' has groups=2"):
        LowRankConv2d.from_conv2d(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(TypeError, match="argument 'conv' must be an nn.Conv2d, got Linear"):
        LowRankConv2d.from_conv2d(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="at most one of the arguments 'rank' and 'energy'"):
        LowRankConv2d.from_conv2d(nn.Conv2d(3, 6, 3), rank=2, energy=0.5)
