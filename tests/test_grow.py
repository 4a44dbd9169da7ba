"""LowRankLinear.grow / freeze: successive refinement inside one layer."""

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear, ops, reference

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_layer(in_features=12, out_features=9, rank=3, **kwargs):
    """A float64 layer whose factors an optimizer has moved off orthonormal, one scale < 0."""
    torch.manual_seed(0)
    layer = LowRankLinear(in_features, out_features, rank, dtype=F64, **kwargs)
    with torch.no_grad():
        layer.U.add_(0.2 * torch.randn_like(layer.U))
        layer.V.add_(0.2 * torch.randn_like(layer.V))
        layer.S.copy_(torch.linspace(2.0, -1.0, rank, dtype=F64))
    return layer


def snapshot(layer):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before, objects):
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value
    for name, tensor in objects.items():
        assert getattr(layer, name) is tensor


def assert_orthonormal(Q, tol=1e-12):
    eye = torch.eye(Q.shape[1], dtype=Q.dtype)
    torch.testing.assert_close(Q.T @ Q, eye, atol=tol, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_grow_keeps_the_weight_and_freezes_its_svd(k):
    layer = trained_layer()
    W = layer.weight.detach().clone()
    layer.grow(k)
    assert (layer.rank, layer.frozen_rank, layer.active_rank) == (3 + k, 3, k)
    torch.testing.assert_close(layer.weight, W, atol=1e-12, rtol=0)
    U, S, V = layer.factors()
    assert_orthonormal(U)
    assert_orthonormal(V)
    # The frozen part is the SVD of the old W (rank 3): same singular values and subspaces.
    P, sigma, Qh = torch.linalg.svd(W)
    torch.testing.assert_close(S[:3], sigma[:3], atol=1e-12, rtol=0)
    torch.testing.assert_close(S[3:], torch.zeros(k, dtype=F64))
    for frozen, truth in ((layer.U_frozen, P[:, :3]), (layer.V_frozen, Qh[:3].T)):
        torch.testing.assert_close(
            (frozen.T @ truth).abs(), torch.eye(3, dtype=F64), atol=1e-10, rtol=0
        )
    assert [name for name, _ in layer.named_parameters()] == ["U", "S", "V", "bias"]
    assert [name for name, _ in layer.named_buffers()] == ["U_frozen", "V_frozen"]


def test_forward_of_a_grown_layer_matches_the_reference():
    layer = trained_layer()
    layer.grow(2, scale_init=0.7)
    with torch.no_grad():
        layer.U.add_(
            torch.randn_like(layer.U)
        )  # raw factors leave the complement: forward must not
    x = torch.randn(5, 4, 12, dtype=F64)
    u = reference.project_out(layer.U_frozen, layer.U, 2, True)
    v = reference.project_out(layer.V_frozen, layer.V, 2, True)
    expected = reference.linear(
        x, torch.cat([layer.U_frozen, u], 1), layer.S, torch.cat([layer.V_frozen, v], 1), layer.bias
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.to_linear()(x), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("freeze_scales", [False, True])
def test_training_stays_in_the_orthogonal_complement(freeze_scales):
    layer = trained_layer()
    layer.grow(1, freeze_scales=freeze_scales)
    frozen = {name: getattr(layer, name).clone() for name in ("U_frozen", "V_frozen")}
    frozen_scales = layer.S_frozen.clone() if freeze_scales else None
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, target = torch.randn(64, 12, dtype=F64), torch.randn(64, 9, dtype=F64)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        optimizer.step()
    for name, value in frozen.items():
        assert torch.equal(getattr(layer, name), value)
    if freeze_scales:
        assert torch.equal(layer.S_frozen, frozen_scales) and layer.S.shape == (1,)
    else:
        assert layer.S_frozen is None and layer.S.shape == (4,)
    # Adam's per-coordinate steps push the raw u into span(U_frozen); the used u never is.
    assert (layer.U_frozen.T @ layer.U).abs().max() > 1e-3
    U, _, V = layer.factors()
    assert_orthonormal(U)
    assert_orthonormal(V)


def test_a_fresh_layer_is_unchanged_and_pays_no_projection(monkeypatch):
    layer = LowRankLinear(10, 8, 3)
    assert set(layer.state_dict()) == {"U", "S", "V", "bias"}
    assert layer.factors() == (layer.U, layer.S, layer.V)

    def forbidden(*args, **kwargs):
        raise AssertionError("a fresh layer projected")

    monkeypatch.setattr(ops, "project_out", forbidden)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), reference.linear(x, layer.U, layer.S, layer.V, layer.bias))


def test_growing_to_full_rank_then_a_clear_error():
    layer = trained_layer(6, 4, 1)
    for rank in (2, 3, 4):
        layer.grow()
        assert layer.rank == rank
    before, objects = snapshot(layer), {n: getattr(layer, n) for n in ("U", "S", "V", "U_frozen")}
    with pytest.raises(ValueError, match=r"'k': growing rank 4 by 1 would pass .* = 4"):
        layer.grow()
    assert_unchanged(layer, before, objects)
    layer.freeze()
    assert (layer.frozen_rank, layer.active_rank, layer.U, layer.V) == (4, 0, None, None)
    assert [name for name, _ in layer.named_parameters()] == ["S", "bias"]
    U, _, V = layer.factors()
    assert_orthonormal(U)
    assert_orthonormal(V)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, "'k' must be a positive int, got 0"),
        ({"k": 1.0}, ValueError, "'k' must be a positive int"),
        ({"k": True}, ValueError, "'k' must be a positive int"),
        ({"k": 3}, ValueError, "'k': growing rank 3 by 3 would pass"),
        ({"freeze_scales": "yes"}, TypeError, "'freeze_scales' must be a bool"),
        ({"scale_init": float("nan")}, ValueError, "'scale_init' must be finite"),
        ({"scale_init": "0"}, TypeError, "'scale_init' must be a real number"),
        ({"generator": 3}, TypeError, "'generator' must be a torch.Generator"),
    ],
)
def test_bad_arguments_name_themselves_and_change_nothing(kwargs, error, match):
    layer = trained_layer(5, 7, 3)
    before, objects = snapshot(layer), {n: getattr(layer, n) for n in ("U", "S", "V")}
    with pytest.raises(error, match=match):
        layer.grow(**kwargs)
    assert_unchanged(layer, before, objects)


def test_full_core_does_not_grow():
    layer = LowRankLinear(6, 5, 2, core="full")
    with pytest.raises(RuntimeError, match="grow/freeze need core='diag'.*core='full'"):
        layer.grow()
    with pytest.raises(RuntimeError, match="core='diag'"):
        layer.freeze()
    assert layer.rank == 2 and layer.U_frozen is None


def test_generator_makes_growth_reproducible():
    first, second = trained_layer(), trained_layer()
    first.grow(2, generator=torch.Generator().manual_seed(5))
    second.grow(2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.U, second.U) and torch.equal(first.V, second.V)


@pytest.mark.parametrize("freeze_scales", [False, True])
@pytest.mark.parametrize("full", [False, True])
def test_grown_checkpoints_round_trip_into_any_layer(freeze_scales, full):
    layer = trained_layer(6, 5, 2)
    layer.grow(2, freeze_scales=freeze_scales, scale_init=0.3)
    if full:
        layer.grow(1, freeze_scales=freeze_scales)
        layer.freeze(freeze_scales=freeze_scales)
    state = layer.state_dict()
    # Tensors only: the frozen part is U_frozen's columns, frozen scales S_frozen's presence.
    assert all(torch.is_tensor(v) for v in state.values())
    assert state["U_frozen"].shape == (5, layer.frozen_rank)
    assert ("S_frozen" in state) == freeze_scales
    x = torch.randn(3, 6, dtype=F64)
    for target in (LowRankLinear(6, 5, 1, dtype=F64), trained_layer(6, 5, 3).requires_grad_()):
        target.load_state_dict(state)
        assert (target.rank, target.frozen_rank) == (layer.rank, layer.frozen_rank)
        assert torch.equal(target(x), layer(x))
        assert target.state_dict().keys() == state.keys()
    # ...and back: a plain checkpoint turns a grown layer into a plain one.
    plain = LowRankLinear(6, 5, 2, dtype=F64)
    target.load_state_dict(plain.state_dict())
    assert target.frozen_rank == 0 and target.U_frozen is None and target.S_frozen is None
    assert torch.equal(target(x), plain(x))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"_extra_state": {"rank": 3, "core": "diag", "frozen": 4, "frozen_scales": False}},
         r"_extra_state: 0.1.0's record .* disagrees with the tensors .*'frozen': 2"),
        ({"_extra_state": {"rank": 3, "core": "diag", "frozen": 2}},
         "_extra_state: expected 0.1.0's layout record"),
        ({"U_frozen": None}, "V_frozen: present without U_frozen"),
        ({"S": None}, r"S: missing from the checkpoint of a grown layer \(U \(5, 1\), S \(3,\)"),
        ({"V_frozen": torch.zeros(6, 3, dtype=F64)},
         r"size mismatch for V_frozen: .*\(6, 3\).*accepts V_frozen of shape \(6, 2\)"),
    ],
)  # fmt: skip
def test_corrupt_grown_checkpoint_is_refused_and_changes_nothing(change, match):
    layer = trained_layer(6, 5, 2)
    layer.grow()
    state = dict(layer.state_dict(), **change)
    state = {k: v for k, v in state.items() if v is not None}
    target = LowRankLinear(6, 5, 2, dtype=F64)
    before, objects = snapshot(target), {n: getattr(target, n) for n in ("U", "S", "V")}
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(state)
    assert_unchanged(target, before, objects)


def test_reset_parameters_of_a_grown_layer_keeps_the_frozen_part():
    layer = trained_layer()
    layer.grow(2)
    frozen = layer.U_frozen.clone()
    layer.reset_parameters()
    assert torch.equal(layer.U_frozen, frozen)
    torch.testing.assert_close(
        layer.U_frozen.T @ layer.U, torch.zeros(3, 2, dtype=F64), atol=1e-12, rtol=0
    )
    assert_orthonormal(layer.U)
    torch.testing.assert_close(layer.S, torch.full((5,), (9 / 15) ** 0.5, dtype=F64))


def test_compile_fullgraph_of_a_grown_layer_matches_eager():
    torch.manual_seed(0)
    layer = LowRankLinear(10, 8, 2)
    layer.grow(2)
    x = torch.randn(6, 10)
    y_eager, y_compiled = layer(x), torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y_compiled, y_eager)
    params = list(layer.parameters())
    grads = [torch.autograd.grad(y.square().sum(), params) for y in (y_eager, y_compiled)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_to_linear_after_freezing_at_full_rank():
    torch.manual_seed(0)
    layer = LowRankLinear(3, 4, 2, dtype=torch.float64)
    layer.grow(1)
    layer.freeze()  # full rank: no active u, v left
    assert layer.U is None
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-12, atol=1e-12)
