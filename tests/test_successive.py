"""lowrank_ext.training.successive, analysis.landscape and plots.successive: growth of whole
models, the optimizer kept in step, the schedule and its records, the noise rank, landscapes and
figures."""

import io
import math
import sys

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear
from lowrank_ext.analysis.landscape import filter_normalized_direction, loss_landscape
from lowrank_ext.nn import LowRankConv2d
from lowrank_ext.training.successive import (
    GrowthSchedule,
    SuccessiveHistory,
    fit_successive,
    grow_model,
    model_rank,
    noise_rank,
    parameter_norms,
    update_optimizer,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(
        LowRankLinear(6, 5, 1, dtype=dtype),
        nn.Tanh(),
        nn.Linear(5, 4, dtype=dtype),
        nn.Tanh(),
        LowRankLinear(4, 3, 1, dtype=dtype),
    )


def adam_steps(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, dtype=F64, generator=g), torch.randn(32, 3, dtype=F64, generator=g)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_planted_layer_recovers_singular_vectors_in_order():
    # Y = W* X + noise with XᵀX = nI: the loss is n‖W − Ŵ‖² + const, so the successive optimum
    # at rank k is Ŵ's best rank-k approximation, Ŵ within the noise of W*.
    g = torch.Generator().manual_seed(0)
    out_features, in_features, n = 7, 10, 200
    P = torch.linalg.qr(torch.randn(out_features, 4, dtype=F64, generator=g))[0]
    Q = torch.linalg.qr(torch.randn(in_features, 4, dtype=F64, generator=g))[0]
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=F64)
    W = P * sigma @ Q.T
    X = torch.linalg.qr(torch.randn(n, in_features, dtype=F64, generator=g))[0] * n**0.5
    Y = X @ W.T + 0.01 * torch.randn(n, out_features, dtype=F64, generator=g)
    torch.manual_seed(0)
    layer = LowRankLinear(in_features, out_features, 1, bias=False, dtype=F64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    weights = {}

    def train_epoch():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(layer(X), Y)
        loss.backward()
        optimizer.step()
        return loss.item()

    def on_rank_end(record, model):
        weights[record.rank] = model.weight.detach().clone()

    schedule = GrowthSchedule(epochs_per_rank=120, max_rank=4, stop_at_noise_rank=False)
    history = fit_successive(
        layer,
        optimizer,
        train_epoch,
        lambda: nn.functional.mse_loss(layer(X), Y).item(),
        schedule,
        on_rank_end=on_rank_end,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert history.stop_reason == "reached max_rank=4" and len(history.epochs) == 480
    U, S, V = layer.factors()
    # k-th learned pair = k-th true pair, in order.
    assert ((U.T @ P).diagonal().abs() > 0.99).all()
    assert ((V.T @ Q).diagonal().abs() > 0.99).all()
    torch.testing.assert_close(S.abs(), sigma, rtol=0.02, atol=0)
    for k, weight in weights.items():
        best = P[:, :k] * sigma[:k] @ Q[:, :k].T
        error = torch.linalg.matrix_norm(weight - best) / torch.linalg.matrix_norm(W)
        assert error < 0.01, (k, error)


def test_growth_keeps_untouched_optimizer_state_and_swaps_the_rest():
    model = small_model()
    head = model[2]
    optimizer = torch.optim.Adam(
        [
            {"params": [p for n, p in model.named_parameters() if n.startswith("0.")], "lr": 0.1},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("0.")]},
        ],
        lr=0.01,
    )
    adam_steps(model, optimizer)
    old = dict(model.named_parameters())
    untouched = [head.weight, head.bias, model[0].bias, model[4].bias]
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in untouched}
    state_objects = {p: dict(optimizer.state[p]) for p in untouched}
    W = [model[0].weight.detach().clone(), model[4].weight.detach().clone()]

    growth = grow_model(model, optimizer=optimizer)

    assert growth.grown == {"0": 2, "4": 2} and growth.frozen == []
    assert (
        sorted(growth.removed) == sorted(growth.added) == ["0.S", "0.U", "0.V", "4.S", "4.U", "4.V"]
    )
    for p in untouched:  # same tensors, same values
        assert all(optimizer.state[p][k] is v for k, v in state_objects[p].items())
        for k, v in state[p].items():
            assert torch.equal(optimizer.state[p][k], v)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(set(held)) == len(list(model.parameters()))
    assert set(held) == set(model.parameters())
    for name in growth.removed:
        assert old[name] not in optimizer.state
    # New tensors join the group of the tensor they replace (lr 0.1 for layer 0).
    assert any(p is model[0].U for p in optimizer.param_groups[0]["params"])
    assert any(p is model[4].U for p in optimizer.param_groups[1]["params"])
    for layer, weight in zip((model[0], model[4]), W):
        torch.testing.assert_close(layer.weight, weight, atol=1e-12, rtol=0)
    before = {name: p.clone() for name, p in model.named_parameters()}
    adam_steps(model, optimizer, steps=2)
    assert not torch.equal(model[0].U, before["0.U"]) and not torch.equal(
        head.weight, before["2.weight"]
    )


def same_objects(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def test_failed_growth_leaves_model_and_optimizer_as_they_were():
    model = nn.Sequential(LowRankLinear(6, 5, 1), nn.ReLU(), LowRankLinear(5, 4, 2, core="full"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 6)).sum().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    groups = [list(group["params"]) for group in optimizer.param_groups]
    state = {name: dict(optimizer.state[p]) for name, p in params.items()}
    with pytest.raises(RuntimeError, match="core='diag'"):  # layer 2 fails after layer 0 grew
        grow_model(model, optimizer=optimizer)
    assert same_objects(dict(model.named_parameters()), params)
    assert model[0].rank == 1 and model[0].U_frozen is None
    assert all(same_objects(dict(zip(g, g)), dict(zip(h["params"], h["params"])))
               for g, h in zip(groups, optimizer.param_groups))  # fmt: skip
    for name, p in params.items():
        assert same_objects(dict(optimizer.state[p]), state[name])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "'k' must be a positive int, got 0"),
        ({"k": "1"}, ValueError, "'k' must be a positive int"),
        ({"optimizer": "adam"}, TypeError, "'optimizer' must be a torch.optim.Optimizer"),
        ({"scale_init": math.inf}, ValueError, "'scale_init' must be finite"),
    ],
)
def test_bad_arguments_to_grow_model(kwargs, error, match):
    model = small_model()
    params = dict(model.named_parameters())
    with pytest.raises(error, match=match):
        grow_model(model, **kwargs)
    assert same_objects(dict(model.named_parameters()), params)


def test_layers_stop_at_full_rank_and_their_groups_drop_out():
    model = nn.Sequential(LowRankLinear(3, 6, 1), nn.ReLU(), LowRankLinear(6, 1, 1))
    optimizer = torch.optim.Adam(model.parameters())
    growth = grow_model(model, optimizer=optimizer)
    assert growth.grown == {"0": 2} and growth.frozen == ["2"]
    assert [n for n, _ in model[2].named_parameters()] == ["S", "bias"]
    assert "2.U" in growth.removed and "2.U" not in growth.added
    assert grow_model(model, 5, optimizer=optimizer).grown == {"0": 3}  # only 1 left
    assert model_rank(model) == 3
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="every low-rank layer is at full rank"):
        grow_model(model, optimizer=optimizer)
    assert same_objects(dict(model.named_parameters()), params)
    with pytest.raises(ValueError, match="no LowRankLinear or LowRankConv2d layer"):
        grow_model(nn.Linear(3, 3))


def test_convolutions_grow_with_the_rest_of_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        LowRankConv2d(2, 6, 3, 1, dtype=F64),
        nn.ReLU(),
        nn.Flatten(),
        LowRankLinear(24, 5, 1, dtype=F64),
    )
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    y = model(x)
    optimizer = torch.optim.Adam(model.parameters())
    growth = grow_model(model, optimizer=optimizer)
    assert growth.grown == {"0": 2, "3": 2}
    torch.testing.assert_close(model(x), y, atol=1e-12, rtol=0)  # new scales start at 0
    U, _, V = model[0].factors()
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=F64), atol=1e-12, rtol=0)
    assert any(p is model[0].U for p in optimizer.param_groups[0]["params"])


@pytest.mark.parametrize(
    "losses, patience, min_delta, expected",
    [
        ({1: 1.0, 2: 0.5, 3: 0.45, 4: 0.449, 5: 0.448, 6: 0.447}, 3, 0.01, (3, True)),
        ({1: 1.0, 2: 0.5, 3: 0.45, 4: 0.449, 5: 0.448}, 3, 0.01, (3, False)),
        ({1: 1.0, 2: 0.5, 3: 0.45, 4: 0.449, 5: 0.448, 6: 0.447}, 3, 0.0, (6, False)),
        ({1: 1.0, 2: 0.8, 3: 0.9, 4: 0.95}, 2, 0.01, (2, True)),
        ({3: 2.0, 5: 1.0, 7: 1.5}, 1, 0.01, (5, True)),
    ],
)
def test_noise_rank_rule(losses, patience, min_delta, expected):
    assert noise_rank(losses, patience, min_delta) == expected


@pytest.mark.parametrize(
    "args, match",
    [
        (({},), "'val_losses' must be a non-empty mapping"),
        (({1: 1.0}, 0), "'patience' must be a positive int"),
        (({1: 1.0}, 2, 1.0), r"'min_delta' must be a number in \[0, 1\)"),
    ],
)
def test_noise_rank_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        noise_rank(*args)


def test_fit_successive_records_what_happened(tmp_path):
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, dtype=F64, generator=g), torch.randn(40, 3, dtype=F64, generator=g)
    seen_grad_norms = []

    def train_epoch():
        losses = []
        for xb, yb in zip(x.split(20), y.split(20)):  # two optimizer steps per epoch
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            seen_grad_norms.append(
                {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
            )
            optimizer.step()
            losses.append(loss.item())
        return sum(losses) / 2

    schedule = GrowthSchedule(epochs_per_rank=3, max_rank=3, stop_at_noise_rank=False)
    history = fit_successive(
        model,
        optimizer,
        train_epoch,
        lambda: 1.0,
        schedule,
        on_rank_end=lambda record, m: {"doubled_rank": 2.0 * record.rank},
        progress=False,
    )
    assert [r.rank for r in history.ranks] == [1, 2, 3] and len(history.epochs) == 9
    assert history.growth_epochs == [3, 6]
    assert history.stop_reason == "reached max_rank=3"
    assert [r.layer_ranks for r in history.ranks] == [{"0": k, "4": k} for k in (1, 2, 3)]
    assert [r.extra for r in history.ranks] == [{"doubled_rank": 2.0 * k} for k in (1, 2, 3)]
    for epoch, record in enumerate(history.epochs):
        steps = seen_grad_norms[2 * epoch : 2 * epoch + 2]
        assert record.grad_norms.keys() == steps[0].keys()
        for name, value in record.grad_norms.items():
            assert value == pytest.approx((steps[0][name] + steps[1][name]) / 2, rel=1e-6)
    last = history.epochs[-1]
    assert last.param_norms == pytest.approx(parameter_norms(model))
    assert last.param_norms["0.U_frozen"] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert "0.U_frozen" not in history.epochs[2].param_norms
    rank_two = history.ranks[1]
    for name, value in rank_two.grad_norms.items():
        expected = sum(history.epochs[e].grad_norms[name] for e in (3, 4, 5)) / 3
        assert value == pytest.approx(expected)
    # A constant validation loss: rank 1 is where it stopped improving, not yet confirmed.
    assert (history.noise_rank, history.noise_rank_confirmed) == (1, False)
    history.to_json(tmp_path / "history.json")
    assert SuccessiveHistory.from_json(tmp_path / "history.json") == history


def test_plateaus_grow_early_and_the_noise_rank_stops_training():
    schedule = GrowthSchedule(epochs_per_rank=50, plateau_patience=2, noise_patience=3)
    model = nn.Sequential(LowRankLinear(8, 8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    val = iter([5.0, 4.0, 4.0, 4.0] + [4.0] * 100)
    history = fit_successive(
        model, optimizer, lambda: 0.0, lambda: next(val), schedule, progress=False
    )
    # Rank 1: 5, 4, 4, 4 (two epochs without improvement after the best); then 3 epochs a rank.
    assert [r.epochs for r in history.ranks] == [4, 3, 3, 3]
    assert (history.noise_rank, history.noise_rank_confirmed) == (1, True)
    assert history.stop_reason.startswith("validation stopped improving")
    assert model[0].rank == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs_per_rank": 0}, "'epochs_per_rank' must be a positive int"),
        ({"plateau_patience": 0}, "'plateau_patience' must be a positive int"),
        ({"max_rank": 1.5}, "'max_rank' must be a positive int"),
        ({"noise_min_delta": -0.1}, "'noise_min_delta' must be a number in"),
    ],
)
def test_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowthSchedule(**kwargs)


def quadratic_setup():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, dtype=F64), LowRankLinear(3, 5, 2, dtype=F64))
    model[1].grow()
    target = {name: torch.randn_like(p) for name, p in model.named_parameters()}

    def loss_fn(m):
        return sum(((p - target[n]) ** 2).sum() for n, p in m.named_parameters())

    return model, loss_fn, target


def test_filter_normalized_directions_match_the_weights_filters():
    model, _, _ = quadratic_setup()
    d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    assert d.keys() == dict(model.named_parameters()).keys()
    weight, U = model[0].weight, model[1].U
    torch.testing.assert_close(d["0.weight"].norm(dim=1), weight.norm(dim=1))  # rows
    torch.testing.assert_close(d["1.U"].norm(dim=0), U.norm(dim=0))  # columns
    for name in ("0.bias", "1.S", "1.bias"):
        assert not d[name].any()
    d = filter_normalized_direction(
        model, generator=torch.Generator().manual_seed(0), include_1d=True
    )
    torch.testing.assert_close(d["1.S"].norm(), model[1].S.norm())


def test_landscape_values_and_exact_restore():
    model, loss_fn, target = quadratic_setup()
    before = {n: p.clone() for n, p in model.named_parameters()}
    land = loss_landscape(
        model, loss_fn, steps=5, span=0.5, generator=torch.Generator().manual_seed(1)
    )
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    assert land.losses.shape == (5, 5)
    assert land.center_loss == pytest.approx(loss_fn(model).item(), rel=1e-14)
    torch.testing.assert_close(land.losses[2, 2].item(), land.center_loss)
    d1, d2 = land.directions
    # Loss = Σ‖θ + a d₁ + b d₂ − target‖², evaluated by hand at every grid point.
    for i, a in enumerate(land.coordinates.tolist()):
        for j, b in enumerate(land.coordinates.tolist()):
            expected = sum(
                ((before[n] + a * d1[n] + b * d2[n] - target[n]) ** 2).sum() for n in before
            )
            assert land.losses[i, j].item() == pytest.approx(expected.item(), rel=1e-12)
    line = loss_landscape(model, loss_fn, directions=1, steps=3, generator=torch.Generator())
    assert line.losses.shape == (3,) and len(line.directions) == 1


def test_landscape_restores_parameters_when_the_loss_fails():
    model, loss_fn, _ = quadratic_setup()
    before = {n: p.clone() for n, p in model.named_parameters()}
    calls = iter(range(100))

    def failing(m):
        if next(calls) == 7:
            raise FloatingPointError("boom")
        return loss_fn(m)

    with pytest.raises(FloatingPointError):
        loss_landscape(model, failing, steps=4)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"directions": 3}, "'directions' must be 1 or 2"),
        ({"steps": 1}, "'steps' must be an int ≥ 2"),
        ({"span": 0.0}, "'span' must be a positive number"),
    ],
)
def test_landscape_bad_arguments(kwargs, match):
    model, loss_fn, _ = quadratic_setup()
    with pytest.raises(ValueError, match=match):
        loss_landscape(model, loss_fn, **kwargs)


def recorded_history():
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = iter([1.0 / (1 + e) for e in range(100)])
    schedule = GrowthSchedule(epochs_per_rank=2, max_rank=3, stop_at_noise_rank=False)

    def train_epoch():
        adam_steps(model, optimizer, steps=1)
        return next(losses)

    history = fit_successive(model, optimizer, train_epoch, lambda: 0.5, schedule, progress=False)
    return model, history


def test_figures_draw_the_recorded_numbers(tmp_path):
    from lowrank_ext.plots import successive as successive_plots

    model, history = recorded_history()
    figure = successive_plots.plot_loss_curve(history, tmp_path / "loss.png")
    ax = figure.axes[0]
    train = next(line for line in ax.lines if line.get_label() == "train")
    assert list(train.get_ydata()) == [r.train_loss for r in history.epochs]
    updates = [line.get_xdata()[0] for line in ax.lines if line.get_color() == "tab:orange"]
    assert updates == history.growth_epochs == [2, 4]
    figure = successive_plots.plot_group_norms(history, tmp_path / "norms.png")
    assert len(figure.axes) == 4  # two low-rank layers × (gradient, parameter) norms
    grad_u = next(line for line in figure.axes[0].lines if line.get_label() == "U")
    assert list(grad_u.get_ydata()) == [r.grad_norms["0.U"] for r in history.ranks]
    land = loss_landscape(model, lambda m: m(torch.ones(2, 6, dtype=F64)).square().mean(), steps=3)
    figure = successive_plots.plot_landscapes(
        {"a": land, "b": land}, tmp_path / "land.png", columns=1
    )
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == ["a", "b"]
    for name in ("loss.png", "norms.png", "land.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_name_the_extra_when_matplotlib_is_missing(monkeypatch):
    from lowrank_ext.plots import successive as successive_plots

    _, history = recorded_history()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install lowrank_ext\[plot\]"):
        successive_plots.plot_loss_curve(history)


def _resume_model():
    torch.manual_seed(3)
    return nn.Sequential(
        LowRankLinear(6, 5, rank=1), nn.Tanh(), nn.Linear(5, 5), LowRankLinear(5, 3, rank=1)
    )


def _adam_step(model, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_the_usual_resume_after_several_growths():
    # issue 17, item 2: the optimizer lists parameters in model order after every growth, so a
    # new optimizer over model.parameters() loads its state_dict and pairs each moment with its
    # own parameter (before, Adam failed: "output with shape [16] doesn't match [16, 16]").
    model = _resume_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    step = 0
    for growth in range(4):  # layer "3" reaches full rank 3 and is frozen on the last growths
        for _ in range(2):
            _adam_step(model, optimizer, step)
            step += 1
        grow_model(model, optimizer=optimizer)
        held = [id(p) for group in optimizer.param_groups for p in group["params"]]
        assert held == [id(p) for p in model.parameters()], f"order after growth {growth + 1}"
    _adam_step(model, optimizer, step)
    assert model[3].frozen_rank == 3 and model[0].rank == 5

    saved = io.BytesIO()  # through a file, as a resume does (no tensor shared between the two)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed = _resume_model()  # built as the training script builds it, at rank 1
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for p, q in zip(model.parameters(), resumed.parameters()):
        state, resumed_state = optimizer.state[p], resumed_optimizer.state[q]
        assert state.keys() == resumed_state.keys()
        for key in state:
            assert torch.equal(state[key], resumed_state[key]), key
    for seed in (100, 101):
        _adam_step(model, optimizer, seed)
        _adam_step(resumed, resumed_optimizer, seed)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_a_new_parameter_without_predecessor_goes_where_model_order_puts_it():
    a, b, c, new = (nn.Parameter(torch.zeros(2)) for _ in range(4))
    optimizer = torch.optim.SGD([a, b, c], lr=0.1)
    before = {"m.a": a, "m.b": b, "m.c": c}
    after = {"m.a": a, "m.new": new, "m.c": c}  # b removed, a new name between a and c
    removed, added = update_optimizer(optimizer, before, after)
    assert removed == ["m.b"] and added == ["m.new"]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(a), id(new), id(c)]
