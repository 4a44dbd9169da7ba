"""LowRankLinear as a drop-in for nn.Linear."""

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear, reference


@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_from_linear_at_full_rank_matches_linear(core, dtype, tol):
    torch.manual_seed(0)
    linear = nn.Linear(24, 17, dtype=dtype)
    layer = LowRankLinear.from_linear(linear, core=core, allow_larger=True)
    assert layer.rank == 17 and layer.core == core
    x = torch.randn(5, 3, 24, dtype=dtype)
    torch.testing.assert_close(layer(x), linear(x), rtol=tol, atol=tol)
    torch.testing.assert_close(layer.weight.detach(), linear.weight, rtol=tol, atol=tol)
    dense = layer.to_linear()
    torch.testing.assert_close(dense(x), linear(x), rtol=tol, atol=tol)


def _planted(sigma, out_features=12, in_features=20):
    g = torch.Generator().manual_seed(1)
    P, _ = torch.linalg.qr(torch.randn(out_features, len(sigma), dtype=torch.float64, generator=g))
    Q, _ = torch.linalg.qr(torch.randn(in_features, len(sigma), dtype=torch.float64, generator=g))
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(P @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ Q.T)
    return linear


def test_truncation_is_the_best_rank_k_approximation():
    sigma = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    linear = _planted(sigma)
    for k in range(1, 6):
        layer = LowRankLinear.from_linear(linear, rank=k)
        error = torch.linalg.matrix_norm(linear.weight - layer.weight) ** 2
        assert error.item() == pytest.approx(sum(s * s for s in sigma[k:]), rel=1e-10)


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.9, 3), (0.98, 5), (0.99, 6), (1.0, 6)])
def test_energy_picks_smallest_rank_holding_that_fraction(energy, rank):
    # σ² = 16, 4, 2, 1, 0.5, 0.25 of 23.75: cumulative 0.674, 0.842, 0.926, 0.968, 0.9895, 1.0
    linear = _planted([4.0, 2.0, 2**0.5, 1.0, 0.5**0.5, 0.5])
    assert LowRankLinear.from_linear(linear, energy=energy).rank == rank


def test_init_matches_linear_output_variance():
    torch.manual_seed(0)
    x = torch.randn(2048, 512)
    dense = torch.stack([nn.Linear(512, 256, bias=False)(x).var() for _ in range(4)]).mean()
    lowrank = torch.stack(
        [LowRankLinear(512, 256, 16, bias=False)(x).var() for _ in range(4)]
    ).mean()
    assert lowrank.item() == pytest.approx(dense.item(), rel=0.1)
    layer = LowRankLinear(64, 48, 8, core="full")
    eye = torch.eye(8)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-6, rtol=0)


def test_drop_in_for_linear_forward_contract():
    layer = LowRankLinear(6, 4, 2)
    assert layer(torch.randn(6)).shape == (4,)
    assert layer(torch.randn(2, 3, 5, 6)).shape == (2, 3, 5, 4)
    assert "in_features=6, out_features=4, rank=2, core='diag', bias=True" in repr(layer)
    model = nn.Sequential(layer, nn.ReLU(), LowRankLinear(4, 3, 1, bias=False))
    assert model(torch.randn(7, 6)).shape == (7, 3)


def test_state_dict_round_trip_and_rank_change():
    torch.manual_seed(0)
    saved = LowRankLinear(10, 8, 5, core="full")
    state = saved.state_dict()
    # Tensors only: the rank and the core are U's columns and S's dims.
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "U": (8, 5),
        "S": (5, 5),
        "V": (10, 5),
        "bias": (8,),
    }
    other = LowRankLinear(10, 8, 2, core="full")
    other.load_state_dict(state)
    assert other.rank == 5
    x = torch.randn(3, 10)
    assert torch.equal(other(x), saved(x))


def test_state_dict_mismatch_names_both_shapes():
    saved = LowRankLinear(10, 8, 3).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for V: .*shape \(10, 3\).* \(11, 2\)"):
        LowRankLinear(11, 8, 2).load_state_dict(saved)
    with pytest.raises(
        RuntimeError, match="checkpoint has core='diag' but the module has core='full'"
    ):
        LowRankLinear(10, 8, 3, core="full").load_state_dict(saved)
    # 0.1.0's record of the layout is checked against the tensors.
    corrupt = dict(saved, _extra_state={"rank": 4, "core": "diag"})
    with pytest.raises(RuntimeError, match=r"_extra_state: 0.1.0's record .*'rank': 4.* disagrees"):
        LowRankLinear(10, 8, 3).load_state_dict(corrupt)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("_extra_state", "garbage", "_extra_state: expected 0.1.0's layout record, a dict"),
        ("U", [[1.0]], "U: the checkpoint holds a list, not a tensor"),
    ],
)
def test_corrupt_checkpoint_gets_a_clear_error(key, value, match):
    corrupt = dict(LowRankLinear(10, 8, 3).state_dict(), **{key: value})
    with pytest.raises(RuntimeError, match=match):
        LowRankLinear(10, 8, 3).load_state_dict(corrupt)


def test_failed_load_leaves_module_unchanged():
    layer = LowRankLinear(10, 8, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError):
        layer.load_state_dict(LowRankLinear(11, 8, 2).state_dict())
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v)


def test_small_regression_trains_to_the_noise_floor():
    # y = W* x + noise with W* of rank 3: a rank-3 layer must reach the noise variance.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 3, generator=g) @ torch.randn(3, 16, generator=g) / 4
    x = torch.randn(512, 16, generator=g)
    noise = 0.05
    y = x @ W.T + noise * torch.randn(512, 10, generator=g)
    torch.manual_seed(0)
    layer = LowRankLinear(16, 10, 3, core="full")
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    for _ in range(400):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 1.3 * noise**2
    assert torch.linalg.matrix_norm(layer.weight - W) / torch.linalg.matrix_norm(W) < 0.05


@pytest.mark.parametrize("core", ["diag", "full"])
def test_compile_fullgraph_matches_eager(core):
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(16, 12, 4, core=core), nn.GELU(), LowRankLinear(12, 5, 3))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(9, 16)
    y_eager = model(x)
    y_compiled = compiled(x)
    torch.testing.assert_close(y_compiled, y_eager)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    grads_compiled = torch.autograd.grad(y_compiled.square().sum(), list(model.parameters()))
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


def test_export_runs_and_matches():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(16, 12, 4), nn.ReLU(), LowRankLinear(12, 5, 2, core="full"))
    x = torch.randn(7, 16)
    program = torch.export.export(model, (x,))
    assert any("lowrank_ext" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), model(x))


def test_forward_and_backward_never_build_the_dense_weight(monkeypatch):
    layer = LowRankLinear(8, 6, 2)
    x = torch.randn(4, 8)
    expected = reference.linear(x, layer.U, layer.S, layer.V, layer.bias)

    def forbidden(*args):
        raise AssertionError("dense W was built")

    monkeypatch.setattr(reference, "dense_weight", forbidden)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, expected)
    with pytest.raises(AssertionError, match="dense W was built"):
        layer.weight  # noqa: B018 - the on-demand view is the only place W is built
