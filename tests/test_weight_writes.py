"""`.weight` is honest: a readable, differentiable dense view that refuses every write, and
`set_weight`, which refactorizes a dense weight by SVD."""

import copy
import io

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankConv2d, LowRankLinear
from lowrank_ext.nn import DenseView, LargerThanDenseError

F64 = torch.float64


def _linear(core="diag", rank=3):
    torch.manual_seed(0)
    return LowRankLinear(8, 6, rank, core=core, dtype=F64)


def _conv(core="diag", rank=3):
    torch.manual_seed(0)
    return LowRankConv2d(2, 5, 3, rank, padding=1, core=core, dtype=F64)


def _snapshot(layer):
    return {name: (t, t.detach().clone()) for name, t in layer.named_parameters()}


def _assert_unchanged(layer, snapshot):
    now = dict(layer.named_parameters())
    assert now.keys() == snapshot.keys()
    for name, (tensor, values) in snapshot.items():
        assert now[name] is tensor, name  # the same Parameter
        assert torch.equal(now[name], values), name  # bit for bit


def _expected_weight(layer):
    """U diag(S) Vᵀ (or U S Vᵀ) in float64, in the dense module's shape."""
    U, S, V = (t.detach().double() for t in (layer.U, layer.S, layer.V))
    core = torch.diag(S) if S.dim() == 1 else S
    return (U @ core @ V.T).reshape(layer._weight_shape())


WRITES = {
    "data.zero_": lambda w: w.data.zero_(),
    "data.copy_": lambda w: w.data.copy_(torch.zeros_like(w)),
    "data.data.fill_": lambda w: w.data.data.fill_(1.0),
    "data setter": lambda w: setattr(w, "data", torch.zeros_like(w)),
    "add_": lambda w: w.add_(1.0),
    "mul_": lambda w: w.mul_(2.0),
    "copy_": lambda w: w.copy_(torch.zeros_like(w)),
    "zero_": lambda w: w.zero_(),
    "fill_": lambda w: w.fill_(1.0),
    "clamp_": lambda w: w.clamp_(0.0, 1.0),
    "set_": lambda w: w.set_(torch.zeros_like(w)),
    "+=": lambda w: w.__iadd__(1.0),
    "setitem": lambda w: w.__setitem__(0, 1.0),
    "view then zero_": lambda w: w[0].zero_(),
    "transpose then copy_": lambda w: w.mT.copy_(torch.zeros_like(w.mT)),
    "torch.zero_": lambda w: torch.zero_(w),
    "out=": lambda w: torch.add(torch.zeros_like(w), 1.0, out=w),
    "relu inplace": lambda w: nn.functional.relu(w, inplace=True),
    "xavier_uniform_": lambda w: nn.init.xavier_uniform_(w),
    "xavier_normal_ by keyword": lambda w: nn.init.xavier_normal_(tensor=w),
    "zeros_": lambda w: nn.init.zeros_(w),
    "ones_": lambda w: nn.init.ones_(w),
    "constant_": lambda w: nn.init.constant_(w, 0.5),
    "kaiming_normal_": lambda w: nn.init.kaiming_normal_(w),
    "kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w),
    "normal_": lambda w: nn.init.normal_(w),
    "uniform_": lambda w: nn.init.uniform_(w),
    "trunc_normal_": lambda w: nn.init.trunc_normal_(w),
    "orthogonal_": lambda w: nn.init.orthogonal_(w),
    "eye_ / dirac_": lambda w: nn.init.eye_(w) if w.dim() == 2 else nn.init.dirac_(w),
}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
@pytest.mark.parametrize("name", list(WRITES))
def test_every_write_raises_and_changes_nothing(name, make, grad):
    layer = make()
    snapshot = _snapshot(layer)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="set_weight") as info:
        WRITES[name](layer.weight)
    assert "the .weight of a low-rank module is a dense view" in str(info.value)
    _assert_unchanged(layer, snapshot)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_assigning_weight_raises_attribute_error(make):
    layer = make()
    snapshot = _snapshot(layer)
    shape = layer._weight_shape()
    for value in (torch.zeros(shape, dtype=F64), nn.Parameter(torch.zeros(shape, dtype=F64))):
        with pytest.raises(AttributeError, match=r"\.weight cannot be assigned: .*set_weight"):
            layer.weight = value
    with pytest.raises(AttributeError, match="set_weight"):
        layer.weight = None
    _assert_unchanged(layer, snapshot)
    assert "weight" not in layer.state_dict() and "weight" not in dict(layer.named_parameters())


@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_reading_is_the_product_of_the_factors_and_differentiable(make, core):
    layer = make(core)
    if core == "full":
        with torch.no_grad():
            layer.S.copy_(torch.randn(3, 3, dtype=F64))
    weight = layer.weight
    assert isinstance(weight, DenseView) and weight.shape == layer._weight_shape()
    torch.testing.assert_close(weight.detach(), _expected_weight(layer), rtol=1e-14, atol=1e-14)
    # Results are plain tensors; views stay read-only views.
    assert type(weight + 1) is torch.Tensor and type(weight.sum()) is torch.Tensor
    assert type(weight.detach()) is torch.Tensor and type(weight.clone()) is torch.Tensor
    assert type(weight.data) is DenseView and type(weight[0]) is DenseView
    plain = torch.zeros(weight.numel(), dtype=F64).view_as(weight)  # a view of another tensor
    assert type(plain) is torch.Tensor and plain.fill_(1.0).sum() == weight.numel()
    # dL/dW = C gives dU = C_m V Sᵀ, dS = Uᵀ C_m V (its diagonal for "diag"), dV = C_mᵀ U S.
    C = torch.randn(layer._weight_shape(), dtype=F64)
    (layer.weight * C).sum().backward()
    C_m = C.reshape(layer.out_features, layer.in_features)
    U, S, V = (t.detach() for t in (layer.U, layer.S, layer.V))
    core_matrix = torch.diag(S) if core == "diag" else S
    torch.testing.assert_close(layer.U.grad, C_m @ V @ core_matrix.T)
    torch.testing.assert_close(layer.V.grad, C_m.T @ U @ core_matrix)
    grad_S = U.T @ C_m @ V
    torch.testing.assert_close(layer.S.grad, torch.diagonal(grad_S) if core == "diag" else grad_S)


def test_copies_saves_and_module_deepcopy_are_plain():
    layer = _linear()
    with torch.no_grad():
        copied = copy.deepcopy(layer.weight)
    assert type(copied) is torch.Tensor and torch.equal(copied, layer.weight.detach())
    copied.zero_()  # a copy is the user's own tensor
    assert layer.weight.abs().sum() > 0
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.save({"w": layer.weight}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]  # no lowrank_ext class on disk
    assert type(loaded) is torch.Tensor and torch.equal(loaded, layer.weight.detach())
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.weight, layer.weight)
    with pytest.raises(RuntimeError, match="set_weight"):
        twin.weight.zero_()
    # The hinted ways work: nn.init on the factors.
    nn.init.orthogonal_(layer.U)
    assert not torch.equal(layer.weight, twin.weight)


def test_compiled_code_reads_the_weight():
    layer = _linear()
    x = torch.randn(4, 8, dtype=F64)

    def read(x):
        return x @ layer.weight.T + layer.weight.sum()

    compiled = torch.compile(read, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), read(x))


# ------------------------------------------------------------------ set_weight


def _best_approximation(W, rank):
    U, sigma, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :rank] @ torch.diag(sigma[:rank]) @ Vh[:rank]


@pytest.mark.parametrize("core", ["diag", "full"])
def test_set_weight_is_the_best_approximation_at_the_modules_rank(core):
    layer = _linear(core)
    bias = layer.bias.detach().clone()
    params = {name: p for name, p in layer.named_parameters()}
    W = torch.randn(6, 8, dtype=torch.float32)  # any float dtype: stored in the factors' dtype
    layer.set_weight(W)
    assert layer.rank == 3 and layer.weight.dtype == F64
    torch.testing.assert_close(layer.weight.detach(), _best_approximation(W, 3))
    assert all(p is params[name] for name, p in layer.named_parameters())  # in place
    assert torch.equal(layer.bias, bias)
    U = layer.U.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=F64))


def test_set_weight_changes_the_rank_with_new_parameters():
    layer = _linear()
    layer.V.requires_grad_(False)
    old_U = layer.U
    W = torch.randn(6, 8, dtype=F64)
    layer.set_weight(W, rank=2)
    assert layer.rank == 2 and layer.U is not old_U and layer.U.shape == (6, 2)
    assert layer.S.shape == (2,) and layer.V.shape == (8, 2) and not layer.V.requires_grad
    torch.testing.assert_close(layer.weight.detach(), _best_approximation(W, 2))
    # energy: the smallest rank holding that fraction of Σσ² (planted: 16, 4, 1 of 21).
    P = torch.linalg.qr(torch.randn(6, 3, dtype=F64))[0]
    Q = torch.linalg.qr(torch.randn(8, 3, dtype=F64))[0]
    planted = P @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=F64)) @ Q.T
    layer.set_weight(planted, energy=0.9)  # 16/21 = 0.76, 20/21 = 0.95
    assert layer.rank == 2
    # Full rank 6 of a 6×8 matrix is past the break-even rank 48 // 15 = 3.
    layer.set_weight(planted, rank=6, allow_larger=True)
    torch.testing.assert_close(layer.weight.detach(), planted)
    layer.set_weight(torch.randn(6, 8, dtype=F64))  # its rank 6 kept: never refused
    assert layer.rank == 6


def test_set_weight_on_a_conv_takes_the_kernel_shape():
    layer = _conv()
    kernel = torch.randn(5, 2, 3, 3, dtype=F64)
    layer.set_weight(kernel, rank=2)
    expected = _best_approximation(kernel.reshape(5, 18), 2).reshape(5, 2, 3, 3)
    torch.testing.assert_close(layer.weight.detach(), expected)
    x = torch.randn(1, 2, 6, 6, dtype=F64)
    reference = nn.functional.conv2d(x, expected, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), reference)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (
            (torch.randn(8, 6, dtype=F64),),
            {},
            ValueError,
            r"shape of LowRankLinear.weight, \(6, 8\)",
        ),
        ((torch.ones(6, 8, dtype=torch.int64),), {}, TypeError, "real floating-point"),
        ((torch.ones(6, 8, dtype=torch.complex128),), {}, TypeError, "real floating-point"),
        (([[0.0] * 8] * 6,), {}, TypeError, "must be a tensor, got list"),
        ((torch.full((6, 8), float("nan"), dtype=F64),), {}, ValueError, "NaN or inf"),
        ((torch.randn(6, 8, dtype=F64),), {"rank": 0}, ValueError, r"'rank' must be .* \[1, 6\]"),
        ((torch.randn(6, 8, dtype=F64),), {"rank": 7}, ValueError, r"'rank' must be .* \[1, 6\]"),
        ((torch.randn(6, 8, dtype=F64),), {"rank": 2, "energy": 0.5}, ValueError, "at most one"),
        ((torch.randn(6, 8, dtype=F64),), {"energy": 1.5}, ValueError, "'energy'"),
        (
            (torch.randn(6, 8, dtype=F64),),
            {"rank": 4},
            LargerThanDenseError,
            "break-even rank is 3",
        ),
        ((torch.randn(6, 8, dtype=F64),), {"allow_larger": "yes"}, TypeError, "'allow_larger'"),
    ],
)
def test_set_weight_errors_leave_the_module_unchanged(args, kwargs, error, match):
    layer = _linear()
    snapshot = _snapshot(layer)
    with pytest.raises(error, match=match):
        layer.set_weight(*args, **kwargs)
    _assert_unchanged(layer, snapshot)


def test_set_weight_refuses_a_grown_layer():
    layer = _linear()
    layer.grow(1)
    snapshot = _snapshot(layer)
    with pytest.raises(RuntimeError, match="3 frozen components"):
        layer.set_weight(torch.randn(6, 8, dtype=F64))
    _assert_unchanged(layer, snapshot)
