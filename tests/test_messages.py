"""Messages that name the argument and what is expected (issue 17, item 8).

Swept: every constructor with integer, complex and bool dtypes; every from_* and convert with
lazy, meta and non-float weights; grow/freeze/grow_model/set_weight on meta tensors; sparse
(COO, CSR, CSC), quantized and nested (strided and jagged) tensors as inputs of
lowrank_ext.linear, project_out, the registered torch.ops (forward and backward) and the modules'
forward, in each argument position.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.training import successive

BAD_DTYPES = [
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    "float32",
]
DTYPE_MESSAGE = r"argument 'dtype' must be a real floating-point torch\.dtype .* got "

CONSTRUCTORS = {
    "LowRankLinear": lambda **kw: LowRankLinear(6, 5, 2, **kw),
    "LowRankConv2d": lambda **kw: LowRankConv2d(2, 5, 3, 2, **kw),
    "LowRankMultiheadAttention": lambda **kw: LowRankMultiheadAttention(6, 2, 2, **kw),
}


def test_shown_input_int64_constructor():
    with pytest.raises(TypeError, match=DTYPE_MESSAGE + "torch.int64"):
        LowRankLinear(6, 5, 2, dtype=torch.int64)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_constructor_dtypes(name, dtype):
    with pytest.raises(TypeError, match=DTYPE_MESSAGE + repr(dtype)):
        CONSTRUCTORS[name](dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_constructor_float_dtypes_build(name, dtype):
    module = CONSTRUCTORS[name](dtype=dtype)
    assert {p.dtype for p in module.parameters()} == {dtype}


# ------------------------------------------------------------------------ lazy, meta, non-float


def _lazy(kind):
    return nn.LazyLinear(5) if kind == "linear" else nn.LazyConv2d(5, 3)


def _from(kind, module, **options):
    if kind == "linear":
        return LowRankLinear.from_linear(module, **options)
    if kind == "conv":
        return LowRankConv2d.from_conv2d(module, **options)
    return LowRankMultiheadAttention.from_multihead_attention(module, **options)


def _argument(kind):
    return {"linear": "linear", "conv": "conv", "attention": "attention"}[kind]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lazy_modules(kind):
    with pytest.raises(ValueError, match=rf"the weight of argument '{kind}' is lazy and not init"):
        _from(kind, _lazy(kind), rank=1)
    model = nn.Sequential(_lazy(kind), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"target '0' is lazy and not initialized"):
        lowrank_ext.convert(model, rank=1)
    with pytest.raises(ValueError, match=r"target '0' is lazy and not initialized"):
        lowrank_ext.OIALR(model, torch.optim.SGD([nn.Parameter(torch.ones(1))]), 0, 1)


def _meta(kind):
    if kind == "linear":
        return nn.Linear(6, 5, device="meta")
    if kind == "conv":
        return nn.Conv2d(2, 5, 3, device="meta")
    return nn.MultiheadAttention(6, 2, device="meta")


@pytest.mark.parametrize("kind", ["linear", "conv", "attention"])
def test_meta_dense_modules(kind):
    what = (
        "in_proj_weight of argument 'attention'"
        if kind == "attention"
        else (f"the weight of argument '{kind}'")
    )
    with pytest.raises(ValueError, match=rf"{what} is on the meta device and holds no values"):
        _from(kind, _meta(kind), rank=1)
    model = nn.Sequential(_meta(kind), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"cannot convert '0' .*is on the meta device"):
        lowrank_ext.convert(model, rank=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_non_float_dense_weights(kind, dtype):
    dense = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(2, 5, 3)
    dense.weight = nn.Parameter(torch.ones(dense.weight.shape).to(dtype), requires_grad=False)
    with pytest.raises(
        TypeError,
        match=rf"the weight of argument '{kind}' must be a real floating-point tensor, got "
        + repr(dtype),
    ):
        _from(kind, dense, rank=1)


def _meta_layers():
    return {
        "LowRankLinear": LowRankLinear(6, 5, 2, device="meta"),
        "LowRankConv2d": LowRankConv2d(2, 5, 3, 2, device="meta"),
    }


@pytest.mark.parametrize("name", ["LowRankLinear", "LowRankConv2d"])
@pytest.mark.parametrize("method", ["grow", "freeze"])
def test_grow_on_meta_names_the_tensor_and_layer(name, method):
    layer = _meta_layers()[name]
    with pytest.raises(
        RuntimeError, match=rf"{method}: U of this {name}\(.*\) is on the meta device"
    ):
        getattr(layer, method)()
    assert layer.rank == 2 and layer.frozen_rank == 0
    model = nn.Sequential(LowRankLinear(6, 6, 1), layer)
    with pytest.raises(RuntimeError, match=r"grow_model: layer '1': U of this .* meta device"):
        successive.grow_model(model)
    assert model[0].rank == 1


@pytest.mark.parametrize("name", ["LowRankLinear", "LowRankConv2d"])
def test_set_weight_meta_and_sparse(name):
    layer = {"LowRankLinear": LowRankLinear(6, 5, 2), "LowRankConv2d": LowRankConv2d(2, 5, 3, 2)}
    layer = layer[name]
    shape = layer._weight_shape()
    with pytest.raises(ValueError, match=r"argument 'weight' is on the meta device"):
        layer.set_weight(torch.ones(shape, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'weight' is a sparse_coo tensor"):
        layer.set_weight(torch.ones(shape).to_sparse())


# ------------------------------------------------------------------------ op inputs


def _kinds(tensor: torch.Tensor) -> dict:
    """The not-dense forms of `tensor` and the words the message uses for each."""
    forms = {
        "sparse_coo": (tensor.to_sparse(), "a sparse_coo tensor"),
        "quantized": (
            torch.quantize_per_tensor(tensor.float(), 0.1, 0, torch.qint8),
            r"a quantized tensor \(torch.qint8",
        ),
    }
    if tensor.dim() == 2:
        forms["sparse_csr"] = (tensor.to_sparse_csr(), "a sparse_csr tensor")
        forms["sparse_csc"] = (tensor.to_sparse_csc(), "a sparse_csc tensor")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nested tensors are a prototype
            rows = list(tensor.unbind())
            forms["nested"] = (
                torch.nested.nested_tensor([rows[0][None], rows[1][None]]),
                "a nested",
            )
            forms["jagged"] = (
                torch.nested.nested_tensor([tensor[:1], tensor[1:]], layout=torch.jagged),
                "a nested",
            )
    return forms


def _linear_args():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=generator)
    U = torch.randn(5, 2, generator=generator)
    S = torch.randn(2, generator=generator)
    V = torch.randn(6, 2, generator=generator)
    b = torch.randn(5, generator=generator)
    return {"x": x, "U": U, "S": S, "V": V, "bias": b}


LINEAR_CALLS = {
    "lowrank_ext.linear": lambda a: lowrank_ext.linear(a["x"], a["U"], a["S"], a["V"], a["bias"]),
    "torch.ops": lambda a: torch.ops.lowrank_ext.linear(a["x"], a["U"], a["S"], a["V"], a["bias"]),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("call", LINEAR_CALLS)
@pytest.mark.parametrize("argument", ["x", "U", "S", "V", "bias"])
def test_linear_op_inputs(argument, call, grad):
    args = _linear_args()
    for kind, (bad, words) in _kinds(args[argument]).items():
        if kind in ("nested", "jagged") and argument != "x":
            continue  # factors are 2-D matrices; nested inputs are activations
        given = dict(args, **{argument: bad})
        if grad:  # another input requires grad: the autograd kernel and linear_forward run
            other = "U" if argument == "V" else "V"
            given[other] = given[other].clone().requires_grad_()
        with pytest.raises(
            RuntimeError, match=rf"lowrank_ext.linear: argument '{argument}' is {words}"
        ):
            LINEAR_CALLS[call](given)


def _project_out_args():
    generator = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(6, 2, generator=generator))[0]
    return {"Q": Q, "X": torch.randn(6, 3, generator=generator)}


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("argument", ["Q", "X"])
def test_project_out_inputs(argument, grad):
    args = _project_out_args()
    calls = (
        lambda a: lowrank_ext.project_out(a["Q"], a["X"], normalize=True),
        lambda a: torch.ops.lowrank_ext.project_out(a["Q"], a["X"]),
    )
    for kind, (bad, words) in _kinds(args[argument]).items():
        if kind == "jagged":
            continue  # a jagged tensor is 3-D: project_out's inputs are matrices
        given = dict(args, **{argument: bad})
        other = "X" if argument == "Q" else "Q"
        if grad:
            given[other] = given[other].clone().requires_grad_()
        for call in calls:
            with pytest.raises(
                RuntimeError, match=rf"lowrank_ext.project_out: argument '{argument}' is {words}"
            ):
                call(given)


def test_backward_ops_name_their_arguments():
    a = _linear_args()
    t = a["x"] @ a["V"]
    grad_y = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"linear_backward: argument 'grad_y' is a sparse_coo"):
        torch.ops.lowrank_ext.linear_backward(
            grad_y.to_sparse(), a["x"], t, a["U"], a["S"], a["V"], [True] * 5
        )
    with pytest.raises(RuntimeError, match=r"linear_backward: argument 't' is a sparse_csr"):
        torch.ops.lowrank_ext.linear_backward(
            grad_y, a["x"], t.to_sparse_csr(), a["U"], a["S"], a["V"], [True] * 5
        )
    p = _project_out_args()
    Y, coeffs, norms = torch.ops.lowrank_ext.project_out_forward(p["Q"], p["X"], 2, False)
    with pytest.raises(
        RuntimeError, match=r"project_out_backward: argument 'grad_Y' is a quantized tensor"
    ):
        torch.ops.lowrank_ext.project_out_backward(
            torch.quantize_per_tensor(torch.randn(6, 3), 0.1, 0, torch.qint8),
            p["Q"],
            p["X"],
            Y,
            coeffs,
            norms,
            2,
            False,
            [True, True],
        )


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_module_forward_inputs(grad):
    torch.manual_seed(0)
    modules = {
        "linear": (LowRankLinear(6, 5, 2), torch.randn(4, 6), "lowrank_ext.linear: argument 'x'"),
        "conv": (LowRankConv2d(2, 5, 3, 2), torch.randn(1, 2, 5, 5), "argument 'input'"),
        "attention": (LowRankMultiheadAttention(6, 2, 2), torch.randn(4, 6), "argument 'query'"),
    }
    for name, (module, x, where) in modules.items():
        module.requires_grad_(grad)
        for bad, words in _kinds(x).values():
            args = (bad, x, x) if name == "attention" else (bad,)
            with pytest.raises(RuntimeError, match=rf"{where} is {words}"):
                module(*args)


def test_dense_inputs_still_run():
    """The refusals live under the sparse/quantized/nested dispatch keys only: dense calls,
    autograd and a fake-tensor trace are unchanged."""
    args = _linear_args()
    args = {k: v.double().requires_grad_() for k, v in args.items()}
    y = lowrank_ext.linear(
        **{"x": args["x"], "U": args["U"], "S": args["S"], "V": args["V"]}, bias=args["bias"]
    )
    reference = ((args["x"] @ args["V"]) * args["S"]) @ args["U"].T + args["bias"]
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert args["U"].grad is not None
    exported = torch.export.export(LowRankLinear(6, 5, 2), (torch.randn(4, 6),))
    assert exported.module()(torch.randn(4, 6)).shape == (4, 5)
