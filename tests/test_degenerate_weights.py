"""Degenerate and non-finite weights (issue 17, item 3).

Zero, tiny (1e-30), rank-deficient weights convert by the one energy rule (Σσ² = 0 → rank 1;
otherwise the smallest k holding the fraction, scale-free), with the truncation the float64 SVD
gives; inf, NaN and -inf weights are refused with an error naming the module or argument, and
the model (and optimizer) unchanged. Swept over from_linear / from_conv2d /
from_multihead_attention, convert (rank and energy), set_weight, grow, grow_model and OIALR's
conversion, for linear, conv and attention layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from unchanged import assert_unchanged, record

import lowrank_ext
from lowrank_ext import OIALR, LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.analysis import spectral
from lowrank_ext.nn import energy_rank
from lowrank_ext.training import successive

KINDS = ("linear", "conv", "attention")
FINITE = ("zero", "tiny", "rank_deficient")
NON_FINITE = ("inf", "nan", "-inf")
PLANTED = torch.tensor([3.0, 1.0, 0.1], dtype=torch.float64)  # energy 0.9 → rank 2 (9/10.01 < 0.9)
ENERGY_RANK = {"zero": 1, "tiny": 2, "rank_deficient": 2}
SCALE = {"zero": 0.0, "tiny": 1e-30, "rank_deficient": 1.0}


class SelfAttention(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attn = attention

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _planted(rows: int, cols: int, scale: float) -> torch.Tensor:
    """A float64 (rows, cols) matrix with singular values scale·PLANTED (rank 3)."""
    generator = torch.Generator().manual_seed(rows * 100 + cols)
    A = torch.linalg.qr(torch.randn(rows, 3, dtype=torch.float64, generator=generator))[0]
    B = torch.linalg.qr(torch.randn(cols, 3, dtype=torch.float64, generator=generator))[0]
    return (A * (PLANTED * scale)) @ B.T


def _dense(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5)
    if kind == "conv":
        return nn.Conv2d(2, 5, 3)
    return nn.MultiheadAttention(6, 2)


def _matrix_of(kind: str, dense: nn.Module) -> torch.Tensor:
    """The dense weight whose values the cases set (attention: the packed in-projection)."""
    return dense.in_proj_weight if kind == "attention" else dense.weight


def _set(kind: str, dense: nn.Module, case: str) -> torch.Tensor:
    """Give the dense module's weight the case's values; returns them as a float64 (out, in)."""
    weight = _matrix_of(kind, dense)
    rows, cols = weight.shape[0], weight[0].numel()
    with torch.no_grad():
        if case in FINITE:
            matrix = (
                _planted(rows, cols, SCALE[case]) if case != "zero" else torch.zeros(rows, cols)
            )
            weight.copy_(matrix.reshape(weight.shape))
        else:
            weight[(1,) * weight.dim()] = {"inf": float("inf"), "nan": float("nan")}.get(
                case, float("-inf")
            )
    return weight.detach().double().reshape(rows, cols)


def _model(kind: str) -> nn.Module:
    dense = _dense(kind)
    if kind == "linear":
        return nn.Sequential(dense, nn.Tanh(), nn.Linear(5, 3))
    if kind == "conv":
        return nn.Sequential(dense, nn.Flatten(), nn.Linear(45, 3))
    return nn.Sequential(SelfAttention(dense), nn.Linear(6, 3))


def _inputs(kind: str) -> tuple:
    generator = torch.Generator().manual_seed(5)
    shape = {"linear": (4, 6), "conv": (4, 2, 5, 5), "attention": (3, 4, 6)}[kind]
    return (torch.randn(shape, generator=generator),)


def _from_dense(kind: str, dense: nn.Module, **options):
    if kind == "linear":
        return LowRankLinear.from_linear(dense, **options)
    if kind == "conv":
        return LowRankConv2d.from_conv2d(dense, **options)
    return LowRankMultiheadAttention.from_multihead_attention(dense, **options)


def _factored(kind: str, module: nn.Module):
    """The factorization of the weight the cases set."""
    return module.in_proj if kind == "attention" else module


def _truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, sigma, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :rank] * sigma[:rank]) @ Vh[:rank]


def _assert_factorizes(layer, matrix: torch.Tensor, rank: int, case: str) -> None:
    """layer holds the best rank-`rank` approximation of `matrix` (float64 truth)."""
    assert layer.rank == rank
    weight = layer.weight.detach().double().reshape(matrix.shape)
    if case == "zero":
        assert torch.equal(weight, torch.zeros_like(weight))
        return
    scale = SCALE[case]
    torch.testing.assert_close(
        weight / scale, _truncation(matrix, rank) / scale, rtol=0, atol=1e-5 * PLANTED[0].item()
    )


# ------------------------------------------------------------------------ the energy rule


def test_energy_rank_rule():
    assert energy_rank(torch.zeros(4), 0.9) == 1
    assert energy_rank(torch.zeros(4), 1.0) == 1
    assert energy_rank(torch.zeros(0), 0.5) == 1
    for scale in (1.0, 1e-30, 1e-200, 1e200):  # squares of 1e-200 underflow, of 1e200 overflow
        assert energy_rank(PLANTED * scale, 0.9) == 2
        assert energy_rank(PLANTED * scale, 0.8) == 1
        assert energy_rank(PLANTED * scale, 1.0) == 3
    assert energy_rank(torch.tensor([2.0, 0.0, 0.0]), 1.0) == 1
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [1.0, -0.5]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            energy_rank(torch.tensor(bad), 0.9)


def test_shown_input_zero_linear_energy():
    """The issue's input: from_linear(zero weight, energy=0.9) raised about a rank 5 nobody gave."""
    linear = nn.Linear(5, 4)
    nn.init.zeros_(linear.weight)
    layer = LowRankLinear.from_linear(linear, energy=0.9)
    assert layer.rank == 1
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), linear.bias.expand(3, 4))
        assert torch.equal(linear(x), linear.bias.expand(3, 4))


def test_suggest_ranks_follows_the_same_rule():
    """spectral.suggest_ranks (analysis) and convert (nn) choose the same ranks, zero layer too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.copy_(_planted(6, 5, 1e-30))
        model[2].weight.copy_(_planted(6, 6, 1.0))
    suggested = spectral.suggest_ranks(spectral.analyze(model), energy=0.9)
    for name in ("0", "1", "2"):
        sigma = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double())
        assert suggested[name] == energy_rank(sigma, 0.9)
    assert [suggested[n] for n in ("0", "1", "2")] == [1, 2, 2]
    lowrank_ext.convert(model, energy=0.9, allow_larger=True)
    assert lowrank_ext.ranks(model) == {n: suggested[n] for n in ("0", "1", "2")}


# ------------------------------------------------------------------------ from_* and convert


@pytest.mark.parametrize("case", FINITE)
@pytest.mark.parametrize("kind", KINDS)
def test_from_dense_finite(kind, case):
    dense = _dense(kind)
    matrix = _set(kind, dense, case)
    by_energy = _from_dense(kind, dense, energy=0.9, allow_larger=True)
    _assert_factorizes(_factored(kind, by_energy), matrix, ENERGY_RANK[case], case)
    by_rank = _from_dense(kind, dense, rank=2)
    _assert_factorizes(_factored(kind, by_rank), matrix, 2, case)


@pytest.mark.parametrize("case", FINITE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", [{"energy": 0.9}, {"rank": 2}], ids=["energy", "rank"])
def test_convert_finite(kind, case, how):
    model = _model(kind)
    dense = model[0].attn if kind == "attention" else model[0]
    matrix = _set(kind, dense, case)
    lowrank_ext.convert(model, allow_larger=True, **how)
    converted = model[0].attn if kind == "attention" else model[0]
    rank = ENERGY_RANK[case] if "energy" in how else 2
    _assert_factorizes(_factored(kind, converted), matrix, rank, case)


def _refusal(kind: str) -> str:
    return {
        "linear": "the weight of argument 'linear'",
        "conv": "the weight of argument 'conv'",
        "attention": "in_proj_weight of argument 'attention'",
    }[kind] + r" holds NaN or inf \(\d NaN, \d inf of its \d+ entries\)"


@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", [{"energy": 0.9}, {"rank": 2}], ids=["energy", "rank"])
def test_from_dense_refuses_non_finite(kind, case, how):
    dense = _dense(kind)
    _set(kind, dense, case)
    before = record(dense)
    with pytest.raises(ValueError, match=_refusal(kind)):
        _from_dense(kind, dense, **how)
    assert_unchanged(before, record(dense))


@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", [{"energy": 0.9}, {"rank": 2}], ids=["energy", "rank"])
def test_convert_refuses_non_finite(kind, case, how):
    model = _model(kind)
    _set(kind, model[0].attn if kind == "attention" else model[0], case)
    before = record(model)
    name = "0.attn" if kind == "attention" else "0"
    with pytest.raises(ValueError, match=rf"cannot convert '{name}' \(\w+\): " + _refusal(kind)):
        lowrank_ext.convert(model, allow_larger=True, **how)
    assert_unchanged(before, record(model))


# ------------------------------------------------------------------------ set_weight


def _low_rank(kind: str):
    torch.manual_seed(1)
    if kind == "linear":
        return LowRankLinear(6, 5, 2)
    if kind == "conv":
        return LowRankConv2d(2, 5, 3, 2)
    return LowRankMultiheadAttention(6, 2, 2)


@pytest.mark.parametrize("case", FINITE + NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
def test_set_weight(kind, case):
    layer = _factored(kind, _low_rank(kind))
    shape = layer._weight_shape()
    matrix = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    if case in FINITE and case != "zero":
        matrix = _planted(layer.out_features, layer.in_features, SCALE[case])
    weight = matrix.reshape(shape).float()
    if case in NON_FINITE:
        weight[(1,) * weight.dim()] = float(case)
        before = record(layer)
        with pytest.raises(ValueError, match=r"argument 'weight' holds NaN or inf \(\d NaN"):
            layer.set_weight(weight, energy=0.9)
        assert_unchanged(before, record(layer))
        return
    matrix = weight.double().reshape(matrix.shape)
    layer.set_weight(weight)  # the module's rank, 2
    _assert_factorizes(layer, matrix, 2, case)
    layer.set_weight(weight, energy=0.9, allow_larger=True)
    _assert_factorizes(layer, matrix, ENERGY_RANK[case], case)


# ------------------------------------------------------------------------ grow and grow_model


def _degenerate_factors(layer, case: str) -> None:
    """Give the layer's scales (S) the case: zero, tiny, one zero scale, or a non-finite entry."""
    with torch.no_grad():
        if case == "zero":
            layer.S.zero_()
        elif case == "tiny":
            layer.S.mul_(1e-30)
        elif case == "rank_deficient":
            layer.S[1] = 0.0
        else:
            layer.S[0] = float(case)


@pytest.mark.parametrize("case", FINITE)
@pytest.mark.parametrize("kind", KINDS)
def test_grow_finite(kind, case):
    layer = _factored(kind, _low_rank(kind))
    _degenerate_factors(layer, case)
    weight = layer.weight.detach().double()
    layer.grow(1)
    assert (layer.rank, layer.frozen_rank) == (3, 2)
    scale = 1e-30 if case == "tiny" else 1.0
    torch.testing.assert_close(layer.weight.detach().double() / scale, weight / scale)


@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["grow", "freeze"])
def test_grow_refuses_non_finite(kind, case, method):
    layer = _factored(kind, _low_rank(kind))
    _degenerate_factors(layer, case)
    before = record(layer)
    name = type(layer).__name__
    with pytest.raises(RuntimeError, match=rf"{method}: S of this {name}\(.*\) holds NaN or inf"):
        getattr(layer, method)()
    assert_unchanged(before, record(layer))


def _low_rank_model(kind: str) -> nn.Module:
    layer = _low_rank(kind)
    if kind == "linear":
        return nn.Sequential(LowRankLinear(6, 6, 1), layer)
    if kind == "conv":
        return nn.Sequential(LowRankConv2d(2, 2, 1, 1), layer)
    return nn.Sequential(LowRankLinear(6, 6, 1), SelfAttention(layer))


@pytest.mark.parametrize("case", FINITE + NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
def test_grow_model(kind, case):
    model = _low_rank_model(kind)
    layer = _factored(kind, model[1].attn if kind == "attention" else model[1])
    _degenerate_factors(layer, case)
    optimizer = torch.optim.Adam(model.parameters())
    if case in FINITE:
        weight = layer.weight.detach().double()
        successive.grow_model(model, optimizer=optimizer)
        assert layer.rank == 3
        scale = 1e-30 if case == "tiny" else 1.0
        torch.testing.assert_close(layer.weight.detach().double() / scale, weight / scale)
        return
    before = record(model, optimizer)
    name = "1.attn.in_proj" if kind == "attention" else "1"
    with pytest.raises(RuntimeError, match=rf"grow_model: layer '{name}': S of this .* NaN or inf"):
        successive.grow_model(model, optimizer=optimizer)
    assert_unchanged(before, record(model, optimizer))


# ------------------------------------------------------------------------ OIALR's conversion


@pytest.mark.parametrize("case", FINITE + NON_FINITE)
@pytest.mark.parametrize("kind", KINDS)
def test_oialr_conversion(kind, case):
    model = _model(kind)
    _set(kind, model[0].attn if kind == "attention" else model[0], case)
    optimizer = torch.optim.Adam(model.parameters())
    inputs = _inputs(kind)
    if case in FINITE:
        with torch.no_grad():
            expected = model(*inputs).double()
        OIALR(model, optimizer, delay=0, frequency=1)
        with torch.no_grad():
            torch.testing.assert_close(model(*inputs).double(), expected, rtol=1e-5, atol=1e-5)
        return
    before = record(model, optimizer)
    name = "0.attn" if kind == "attention" else "0"
    with pytest.raises(ValueError, match=rf"cannot convert '{name}'.*NaN or inf"):
        OIALR(model, optimizer, delay=0, frequency=1)
    assert_unchanged(before, record(model, optimizer))
    # Through step(), after dense steps: also nothing changed, the step count included.
    oialr = OIALR(model, optimizer, delay=2, frequency=1)
    oialr.step()
    before = record(model, optimizer)
    with pytest.raises(ValueError, match=rf"cannot convert '{name}'.*NaN or inf"):
        oialr.step()
    assert_unchanged(before, record(model, optimizer))
    assert (oialr.steps, oialr.converted, oialr.history) == (1, False, [])


# ------------------------------------------------------------------------ transformers' Conv1D


@pytest.mark.parametrize("case", FINITE + NON_FINITE)
def test_conv1d(case):
    """GPT-2's Conv1D stores W transposed (in, out): the same rule and refusals, through
    from_conv1d and convert."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6), nn.Tanh(), nn.Linear(5, 3))
    layer = model[0]
    with torch.no_grad():
        if case in FINITE:
            matrix = _planted(5, 6, SCALE[case]) if case != "zero" else torch.zeros(5, 6)
            layer.weight.copy_(matrix.T)
        else:
            layer.weight[1, 1] = float(case)
    if case in NON_FINITE:
        refusal = r"the weight of argument 'conv1d' holds NaN or inf \(\d NaN, \d inf of its 30"
        with pytest.raises(ValueError, match=refusal):
            LowRankLinear.from_conv1d(layer, energy=0.9)
        before = record(model)
        with pytest.raises(ValueError, match=r"cannot convert '0' \(Conv1D\): " + refusal):
            lowrank_ext.convert(model, energy=0.9, allow_larger=True)
        assert_unchanged(before, record(model))
        return
    matrix = layer.weight.detach().double().T
    _assert_factorizes(
        LowRankLinear.from_conv1d(layer, energy=0.9), matrix, ENERGY_RANK[case], case
    )
    lowrank_ext.convert(model, energy=0.9, allow_larger=True)
    _assert_factorizes(model[0], matrix, ENERGY_RANK[case], case)


def test_oialr_cut_of_a_zero_core():
    """OIALR's cut follows the same rule: a zero core (σ_max = 0) keeps one component (within
    max_drop and min_rank), not all of them."""
    model = _model("linear")
    _set("linear", model[0], "zero")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the core stays zero
    oialr = OIALR(model, optimizer, delay=0, frequency=1, cutoff=0.1, max_drop=1.0)
    assert oialr.ranks()["0"] == 5
    inputs = _inputs("linear")
    model(*inputs).sum().backward()
    optimizer.step()
    oialr.step()
    assert oialr.ranks()["0"] == 1
    with torch.no_grad():
        assert torch.equal(model[0](inputs[0]), model[0].bias.expand(4, 5))
