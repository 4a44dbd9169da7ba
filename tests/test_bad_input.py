"""Bad input gets a clear error that names the argument — never a crash or a wrong answer."""

import pytest
import torch
from factors import make_factors

import lowrank_ext
from lowrank_ext import LowRankLinear


def good(**overrides):
    x, U, S, V, b = make_factors((4,), 6, 5, 3, dtype=torch.float32)
    args = {"x": x, "U": U, "S": S, "V": V, "bias": b}
    args.update(overrides)
    return args


def call(args):
    return lowrank_ext.linear(args["x"], args["U"], args["S"], args["V"], args["bias"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"x": torch.tensor(1.0)}, "'x' must have at least 1 dimension"),
        ({"U": torch.randn(5)}, "'U' must be 2-D"),
        ({"V": torch.randn(6, 3, 1)}, "'V' must be 2-D"),
        (
            {"U": torch.randn(5, 0), "V": torch.randn(6, 0), "S": torch.randn(0)},
            "'U' must have at least one column",
        ),
    ],
)
def test_wrong_dims(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        call(good(**overrides))


def test_rank_mismatch_between_U_and_V():
    with pytest.raises(RuntimeError, match="'V' has 4 columns but U has 3"):
        call(good(V=torch.randn(6, 4)))


def test_in_features_mismatch():
    with pytest.raises(RuntimeError, match=r"'V' has shape \[7, 3\] but x has 6 features"):
        call(good(V=torch.randn(7, 3)))


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 3), (3, 2)])
def test_core_of_wrong_shape(shape):
    with pytest.raises(RuntimeError, match=r"'S' must have shape \(3,\) .* or \(3, 3\)"):
        call(good(S=torch.randn(shape)))


@pytest.mark.parametrize("shape", [(4,), (5, 1), ()])
def test_bias_of_wrong_shape(shape):
    with pytest.raises(RuntimeError, match=r"'bias' must have shape \(5,\)"):
        call(good(bias=torch.randn(shape)))


@pytest.mark.parametrize("name", ["U", "S", "V", "bias"])
def test_dtype_mismatch(name):
    args = good()
    args[name] = args[name].double()
    with pytest.raises(RuntimeError, match=f"'{name}' has dtype Double but x has dtype Float"):
        call(args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensors(dtype):
    args = {k: v.to(dtype) for k, v in good().items()}
    with pytest.raises(RuntimeError, match="'x' has dtype .* supports float32 or float64"):
        call(args)


def test_half_precision_on_cpu_names_supported_dtypes():
    args = {k: v.half() for k, v in good().items()}
    with pytest.raises(RuntimeError, match="CPU kernel supports float32 or float64"):
        call(args)


def test_device_mismatch():
    args = good()
    args["U"] = args["U"].to("meta")
    with pytest.raises(RuntimeError, match="'U' is on meta but x is on cpu"):
        call(args)


def test_backward_op_checks_grad_y_and_t():
    x, U, S, V, _ = make_factors((4,), 6, 5, 3)
    with pytest.raises(RuntimeError, match=r"'grad_y' must have shape \[4, 5\]"):
        torch.ops.lowrank_ext.linear_backward(
            torch.randn(4, 6, dtype=x.dtype), x, x @ V, U, S, V, [True] * 5
        )
    with pytest.raises(RuntimeError, match=r"'t' \(the saved x V\) must have shape \(4, 3\)"):
        torch.ops.lowrank_ext.linear_backward(
            torch.randn(4, 5, dtype=x.dtype),
            x,
            torch.randn(3, 3, dtype=x.dtype),
            U,
            S,
            V,
            [True] * 5,
        )


@pytest.mark.parametrize("rank", [0, -1, 6, 2.0, True])
def test_module_rank_out_of_range(rank):
    with pytest.raises(
        ValueError,
        match=r"'rank' must be an int in \[1, min\(in_features, out_features\)\] = \[1, 5\]",
    ):
        LowRankLinear(6, 5, rank)


@pytest.mark.parametrize("name, args", [("in_features", (0, 5, 1)), ("out_features", (6, -2, 1))])
def test_module_bad_features(name, args):
    with pytest.raises(ValueError, match=f"'{name}' must be a positive int"):
        LowRankLinear(*args)


def test_module_bad_core():
    with pytest.raises(ValueError, match="'core' must be one of"):
        LowRankLinear(6, 5, 2, core="dense")


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.01, float("nan"), "0.9"])
def test_energy_outside_unit_interval(energy):
    with pytest.raises(ValueError, match=r"'energy' must be a number in \(0, 1\]"):
        LowRankLinear.from_linear(torch.nn.Linear(6, 5), energy=energy)


def test_from_linear_rank_and_energy_together():
    with pytest.raises(ValueError, match="at most one of the arguments 'rank' and 'energy'"):
        LowRankLinear.from_linear(torch.nn.Linear(6, 5), rank=2, energy=0.5)


def test_from_linear_wrong_type():
    with pytest.raises(TypeError, match="'linear' must be an nn.Linear"):
        LowRankLinear.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_module_input_of_wrong_width():
    layer = LowRankLinear(6, 5, 2)
    with pytest.raises(RuntimeError, match="x has 7 features"):
        layer(torch.randn(3, 7))


# ---- found by a review of the C++ autograd (issue 13) ------------------------------------------


def test_backward_op_with_one_meta_argument_is_refused_not_garbage():
    x, U, S, V = torch.randn(3, 4), torch.randn(5, 2), torch.randn(2), torch.randn(4, 2)
    dy = torch.randn(3, 5)
    backward = torch.ops.lowrank_ext.linear_backward
    with pytest.raises(RuntimeError, match="argument 't' is on meta but x is on cpu"):
        backward(dy, x, torch.randn(3, 2, device="meta"), U, S, V, [True] * 5)
    with pytest.raises(RuntimeError, match="'U' is on meta but x is on cpu"):
        backward(dy, x, x @ V, U.to("meta"), S, V, [True] * 5)


def test_project_out_backward_with_one_meta_argument_is_refused():
    Q = torch.linalg.qr(torch.randn(6, 2))[0]
    X = torch.randn(6, 3)
    Y, coeffs, norms = torch.ops.lowrank_ext.project_out_forward(Q, X, 2, False)
    with pytest.raises(RuntimeError, match="argument 'coeffs' is on meta but X is on cpu"):
        torch.ops.lowrank_ext.project_out_backward(
            torch.randn(6, 3), Q, X, Y, coeffs.to("meta"), norms, 2, False, [True, True]
        )


@pytest.mark.parametrize("batch", [(3,), (0,), (2, 0)])
def test_double_backward_with_no_output_features(batch):
    # The bias gradient of an empty output is (0,), also under create_graph=True.
    x = torch.randn(*batch, 4, dtype=torch.float64)
    U, S, V = (torch.randn(*s, dtype=torch.float64) for s in ((0, 2), (2,), (4, 2)))
    b = torch.randn(0, dtype=torch.float64, requires_grad=True)
    y = lowrank_ext.linear(x, U, S, V, b)
    (grad,) = torch.autograd.grad(y, b, torch.ones_like(y), create_graph=True)
    assert grad.shape == (0,)


def test_forward_mode_ad_is_refused_not_dropped():
    import torch.autograd.forward_ad as fwAD

    x, U, S, V = torch.randn(3, 4), torch.randn(5, 2), torch.randn(2), torch.randn(4, 2)
    with fwAD.dual_level():
        dual = fwAD.make_dual(U, torch.ones_like(U))
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
            lowrank_ext.linear(x, dual, S, V)
        dual_x = fwAD.make_dual(torch.randn(6, 2), torch.ones(6, 2))
        with pytest.raises(RuntimeError, match="project_out: forward-mode AD"):
            lowrank_ext.project_out(torch.linalg.qr(torch.randn(6, 1))[0], dual_x)
