"""convert(budget=...): the uniform share, the allocation by sensitivity against an exhaustive
search, the parameter counts, and every bad input named with the model left unchanged."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from test_compress_whitened import inputs, mlp
from torch import nn

import lowrank_ext
from lowrank_ext.compress import allocate, measure_sensitivity
from lowrank_ext.nn.calibrated import uniform_rank
from lowrank_ext.nn.truncation import break_even_rank, factored_size


def deep(seed=0, width=32, depth=4):
    torch.manual_seed(seed)
    layers = [nn.Linear(24, width)]
    for _ in range(depth - 1):
        layers += [nn.Tanh(), nn.Linear(width, width)]
    return nn.Sequential(*layers).double()


NAMES = ["0", "2", "4", "6"]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, saved):
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def test_uniform_budget_keeps_the_same_fraction_in_every_layer():
    model = deep()
    lowrank_ext.convert(model, budget=0.4, target_modules=NAMES)
    total = sum(24 * 32 if n == "0" else 32 * 32 for n in NAMES)
    spent = 0
    for layer in (model[0], model[2], model[4], model[6]):
        expected = uniform_rank(layer.in_features, layer.out_features, 0.4)
        assert layer.rank == expected
        # the largest rank within 40 % of this layer's numbers
        assert (
            factored_size(layer.in_features, layer.out_features, expected)
            <= 0.4 * (layer.in_features * layer.out_features)
            < factored_size(layer.in_features, layer.out_features, expected + 1)
        )
        spent += factored_size(layer.in_features, layer.out_features, layer.rank)
    assert spent <= 0.4 * total
    # an int budget is a count of numbers: the same split for the same fraction
    other = lowrank_ext.convert(deep(), budget=int(0.4 * total), target_modules=NAMES)
    assert lowrank_ext.ranks(other) == lowrank_ext.ranks(model)


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_budget_that_pays_for_the_dense_model_keeps_it_exact(calibrated):
    # budget=1.0 (or the int count of every targeted weight) shared uniformly: a dense layer
    # costs what the share pays and is exact, the break-even rank is not, so all stay dense.
    model = deep()
    x = torch.randn(9, 24, dtype=torch.float64)
    expected, saved = model(x), state(model)
    total = 24 * 32 + 3 * 32 * 32
    options = {}
    if calibrated:
        options["calibration"] = lowrank_ext.calibrate(model, [x], target_modules=NAMES,
                                                       progress=False)  # fmt: skip
    for budget in (1.0, total):
        lowrank_ext.convert(model, budget=budget, target_modules=NAMES, **options)
        assert lowrank_ext.ranks(model) == {} and same(model, saved)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_allocation_is_near_the_exhaustive_optimum(seed):
    # four 12×10 layers: ranks 1…5 (break-even) or dense, every combination searched
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: (12, 10, torch.rand(10, generator=g, dtype=torch.float64).sort()[0].flip(0) * scale)
        for name, scale in zip("abcd", (1.0, 3.0, 0.5, 2.0))
    }
    sensitivity = {"a": 2.0, "b": 0.3, "c": 5.0, "d": 1.0}
    choices = [*range(1, break_even_rank(12, 10) + 1), None]  # None: dense (120 numbers)

    def size(rank):
        return 12 * 10 if rank is None else factored_size(12, 10, rank)

    def objective(ranks):
        return sum(
            0.0 if r is None else sensitivity[n] * float((layers[n][2][r:] ** 2).sum())
            for n, r in ranks.items()
        )

    step = size(2) - size(1)
    ratios = []
    for budget in (4 * size(1) + k * step for k in (0, 3, 7, 12, 15)):
        got = allocate(layers, budget, "diag", sensitivity)
        best = min(
            objective(dict(zip("abcd", combo)))
            for combo in itertools.product(choices, repeat=4)
            if sum(size(r) for r in combo) <= budget
        )
        assert sum(size(r) for r in got.values()) <= budget
        uniform = allocate(layers, budget, "diag", None)
        assert objective(got) <= objective(uniform) + 1e-12
        ratios.append(objective(got) / best)
    # a knapsack: greedy can miss by the last steps that did not fit; at most 6 % on these
    # 20 problems (the measured worst is 5.6 %), exact on 13 of them
    assert max(ratios) < 1.06 and sum(r < 1 + 1e-12 for r in ratios) >= 2


def test_allocation_keeps_a_layer_dense_past_its_break_even_rank():
    sigma = torch.linspace(1, 0.5, 10, dtype=torch.float64)
    layers = {"big": (12, 10, sigma), "small": (12, 10, sigma * 1e-3)}
    budget = 12 * 10 + factored_size(12, 10, 1)
    got = allocate(layers, budget, "diag", {"big": 1.0, "small": 1.0})
    assert got == {"big": None, "small": 1}


def test_sensitivity_budget_beats_uniform_on_the_calibration_model():
    X = inputs(rows=400)
    model = deep(seed=1)
    with torch.no_grad():  # make the last layers matter more: scale their weights up
        model[6].weight.mul_(4.0)
    stats = lowrank_ext.calibrate(model, [X], target_modules=NAMES, progress=False)
    measured = measure_sensitivity(model, stats, [X], 0.4, progress=False)
    assert set(measured) == set(NAMES) and all(v > 0 for v in measured.values())
    reference = model(X).detach()
    errors = {}
    for label, sensitivity in (("uniform", None), ("allocated", measured)):
        stats.sensitivity = sensitivity
        compressed = lowrank_ext.convert(
            copy.deepcopy(model), budget=0.4, target_modules=NAMES, calibration=stats
        )
        counts = lowrank_ext.conversion_summary(compressed)
        assert counts.parameters_after < counts.parameters_before
        errors[label] = float((compressed(X).detach() - reference).norm())
    assert errors["allocated"] < errors["uniform"]


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2, 0, 10**9, True, "half", math.nan])
def test_budget_outside_its_range_is_named_and_changes_nothing(budget):
    model = deep()
    saved = state(model)
    with pytest.raises((ValueError, TypeError), match="argument 'budget'"):
        lowrank_ext.convert(model, budget=budget, target_modules=NAMES)
    assert same(model, saved) and isinstance(model[0], nn.Linear)


def test_budget_with_rank_or_a_non_linear_target_is_refused():
    model = deep()
    saved = state(model)
    with pytest.raises(ValueError, match="either 'budget' or 'rank'"):
        lowrank_ext.convert(model, budget=0.5, rank=3, target_modules=NAMES)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(
        ValueError, match=r"argument 'budget' covers linear layers.*'0' is a Conv2d"
    ):
        lowrank_ext.convert(conv, budget=0.5, target_modules=["0", "2"])
    assert same(model, saved)


def test_budget_too_small_for_rank_one_is_refused():
    model = deep()
    with pytest.raises(ValueError, match="argument 'budget'.*rank 1"):
        lowrank_ext.convert(model, budget=10, target_modules=NAMES)
    assert isinstance(model[0], nn.Linear)


def test_calibration_bad_inputs_are_named_and_leave_the_model_unchanged():
    model = mlp()
    saved = state(model)
    X = inputs()
    bad = X.clone()
    bad[3, 5] = math.nan
    with pytest.raises(ValueError, match=r"batch 1 gives layer '0' an input with NaN or inf"):
        lowrank_ext.calibrate(model, [X, bad], target_modules=["0", "2"], progress=False)
    with pytest.raises(ValueError, match="argument 'batches' is empty"):
        lowrank_ext.calibrate(model, iter([]), target_modules=["0"], progress=False)
    with pytest.raises(TypeError, match="argument 'batches': each item"):
        lowrank_ext.calibrate(model, [3], target_modules=["0"], progress=False)
    assert same(model, saved) and model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_layer_the_batches_never_reach_is_named():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"never received an input.*: unused"):
        lowrank_ext.calibrate(Branch(), [torch.randn(3, 4)], target_modules=["used", "unused"],
                              progress=False)  # fmt: skip


def test_statistics_from_another_model_are_refused():
    X = inputs()
    stats = lowrank_ext.calibrate(mlp(seed=0), [X], target_modules=["0"], progress=False)
    other = mlp(seed=1)  # same shapes, other weights
    saved = state(other)
    with pytest.raises(ValueError, match=r"statistics of layer '0' were collected on another"):
        lowrank_ext.convert(other, rank=3, target_modules=["0"], calibration=stats)
    assert same(other, saved) and isinstance(other[0], nn.Linear)
    with pytest.raises(ValueError, match=r"no statistics for layer '2'"):
        lowrank_ext.convert(mlp(seed=0), rank=3, target_modules=["0", "2"], calibration=stats)
    wider = nn.Sequential(nn.Linear(30, 20))
    with pytest.raises(ValueError, match=r"shape \(20, 24\), now \(20, 30\)"):
        lowrank_ext.convert(wider, rank=3, target_modules=["0"], calibration=stats)
    with pytest.raises(TypeError, match="argument 'calibration' must have a factorization"):
        lowrank_ext.convert(mlp(), rank=3, target_modules=["0"], calibration={"0": 1})


@pytest.mark.parametrize(
    "arguments", [{"sensitivity": 2.0}, {"sensitivity": 1}, {"sensitivity": 0.5,
                                                            "sensitivity_batches": 0}]
)  # fmt: skip
def test_refused_sensitivity_arguments_leave_no_hook_behind(arguments):
    # The arguments were once checked after the hooks went on: every refused call left one
    # calibration hook per layer, which then ran (and raised) on the model's ordinary calls.
    model = mlp()
    saved = state(model)
    with pytest.raises(ValueError, match="argument 'sensitivity"):
        lowrank_ext.calibrate(model, [inputs()], target_modules=["0", "2"], progress=False,
                              **arguments)  # fmt: skip
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert same(model, saved)
    nan_input = torch.full((2, model[0].in_features), math.nan, dtype=torch.float64)
    assert torch.isnan(model(nan_input)).all()  # an ordinary forward, no calibration error


def test_statistics_of_a_permuted_model_are_refused():
    # Reordering the hidden units (rows of layer 0 and bias, columns of layer 2) keeps the
    # function and Σw, Σw² of both weights; layer 2's second moment is then in the wrong order.
    X = inputs()
    model = mlp(seed=0)
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0", "2"], progress=False)
    permuted = copy.deepcopy(model)
    order = torch.randperm(model[0].out_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        permuted[0].weight.copy_(model[0].weight[order])
        permuted[0].bias.copy_(model[0].bias[order])
        permuted[2].weight.copy_(model[2].weight[:, order])
        torch.testing.assert_close(permuted(X), model(X))
    with pytest.raises(ValueError, match=r"statistics of layer '0' were collected on another"):
        lowrank_ext.convert(permuted, rank=3, target_modules=["0", "2"], calibration=stats)
    lowrank_ext.convert(model, rank=3, target_modules=["0", "2"], calibration=stats)  # control
