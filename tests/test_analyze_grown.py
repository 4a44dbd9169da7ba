"""spectral.analyze over every state rank growth leaves (issue 17, item 1).

Each state of LowRankLinear and LowRankConv2d that grow/freeze can produce (grown once or
several times, scales frozen or not, frozen at full rank, a fresh component at scale 0, a core
"full" layer, OIALR's truncated layers, a LowRankMultiheadAttention grown through grow_model) is
analysed from the module, from its state_dict in memory, from a torch.save file, from a
safetensors file and through `lowrank-ext analyze` on both files. Every σ is compared with
float64 torch.linalg.svdvals of the module's dense weight, every rank with the rank of that
weight.
"""

import json
from collections import OrderedDict

import pytest
import torch
from conftest import requires_cuda
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank_ext
from lowrank_ext import (
    OIALR,
    LowRankConv2d,
    LowRankLinear,
    LowRankMultiheadAttention,
    cli,
    spectral,
)
from lowrank_ext.training.growth import grow_model

RTOL = 1e-3  # analyze's default relative tolerance of the hard rank


def _trained(layer: nn.Module, seed: int) -> None:
    """Move every trainable factor off its initial value, as training would (the fresh
    components too, so that no σ is 0 by accident)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("U", "S", "V"):
            tensor = getattr(layer, name)
            if tensor is not None:
                noise = torch.randn(tensor.shape, dtype=torch.float64, generator=generator)
                tensor.add_(0.3 * noise.to(tensor.dtype))


def _grow(layer, k=1, seed=0, **options):
    layer.grow(k, generator=torch.Generator().manual_seed(seed), **options)


def _issue_example(layer):
    # 12 → 10 at rank 2, grown by 1, S set to 0.7 (the issue's LowRankLinear; the same on conv).
    _grow(layer)
    with torch.no_grad():
        layer.S.fill_(0.7)


def _issue_example_frozen_scales(layer):
    _grow(layer, freeze_scales=True)
    with torch.no_grad():
        layer.S.fill_(0.7)


def _grown_three_times(layer):
    _grow(layer, seed=1)
    _trained(layer, 2)
    _grow(layer, seed=3, freeze_scales=True)
    _trained(layer, 4)
    _grow(layer, 2, seed=5)
    _trained(layer, 6)


def _to_full_rank(layer):
    _grow(layer, min(layer.in_features, layer.out_features) - layer.rank, seed=7)
    _trained(layer, 8)


def _frozen_at_full_rank(layer):
    _to_full_rank(layer)
    layer.freeze()


def _frozen_at_full_rank_scales_frozen(layer):
    _to_full_rank(layer)
    layer.freeze(freeze_scales=True)


def _fresh_component_at_scale_zero(layer):
    _grow(layer, seed=9)  # scale_init=0: W has rank f, one below the layer's r


def _grown_by_two_trained(layer):
    _grow(layer, 2, seed=10)
    _trained(layer, 11)  # two active columns, no longer orthogonal to each other


def _grown_then_trained_scales_frozen(layer):
    _grow(layer, seed=12, freeze_scales=True)
    _trained(layer, 13)


STATES = {
    "never grown": lambda layer: None,
    "issue example": _issue_example,
    "issue example, scales frozen": _issue_example_frozen_scales,
    "grown by 2, trained": _grown_by_two_trained,
    "grown, scales frozen, trained": _grown_then_trained_scales_frozen,
    "grown three times": _grown_three_times,
    "grown to full rank": _to_full_rank,
    "frozen at full rank": _frozen_at_full_rank,
    "frozen at full rank, scales frozen": _frozen_at_full_rank_scales_frozen,
    "fresh component at scale 0": _fresh_component_at_scale_zero,
}


def _linear(core="diag"):
    torch.manual_seed(0)
    layer = LowRankLinear(12, 10, 2, core=core).double()
    _trained(layer, 100)
    return layer


def _conv(core="diag"):
    torch.manual_seed(0)
    layer = LowRankConv2d(3, 8, 3, rank=2, core=core).double()  # W: 8 × 27, full rank 8
    _trained(layer, 101)
    return layer


LAYERS = {"LowRankLinear": _linear, "LowRankConv2d": _conv}


def _truth(layer) -> torch.Tensor:
    """σ of the module's dense weight (as (out, in·kh·kw)), float64, descending."""
    dense = layer.weight.detach().double().reshape(layer.out_features, -1)
    return torch.linalg.svdvals(dense)


def _check_row(row, layer, true):
    scale = float(true[0])
    assert row.shape == (layer.out_features, layer.in_features)
    assert row.factored and row.full_rank == layer.rank
    torch.testing.assert_close(row.singular_values, true, rtol=1e-9, atol=1e-12 * scale)
    assert row.hard_rank == int((true > RTOL * scale).sum())
    assert row.numerical_rank == int((true > row.numerical_tol).sum())
    assert row.sigma_min == pytest.approx(float(true[layer.rank - 1]), rel=1e-9, abs=1e-12 * scale)


def _check_json(row: dict, layer, true):
    scale = float(true[0])
    assert row["name"] == "layer" and row["full_rank"] == layer.rank
    assert row["sigma_max"] == pytest.approx(scale, rel=1e-9)
    assert row["frobenius_norm"] == pytest.approx(float(true.norm()), rel=1e-9)
    assert row["sigma_min"] == pytest.approx(float(true[layer.rank - 1]), rel=1e-9, abs=1e-12)
    assert row["hard_rank"] == int((true > RTOL * scale).sum())


def _cli_rows(path, capsys) -> list[dict]:
    assert cli.main(["analyze", str(path), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)["layers"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", LAYERS)
def test_every_growth_state_from_every_source(kind, state, tmp_path, capsys):
    layer = LAYERS[kind]()
    STATES[state](layer)
    true = _truth(layer)
    model = nn.ModuleDict({"layer": layer})
    state_dict = model.state_dict()
    torch.save(state_dict, tmp_path / "model.pt")
    save_file(state_dict, str(tmp_path / "model.safetensors"))

    sources = {
        "module": model,
        "state_dict": state_dict,
        "torch.save": torch.load(tmp_path / "model.pt", weights_only=True),
        "safetensors": load_file(str(tmp_path / "model.safetensors")),
    }
    for source, obj in sources.items():
        report = spectral.analyze(obj)
        assert [row.name for row in report] == ["layer"], source  # no U_frozen etc. as rows
        _check_row(report["layer"], layer, true)
    for file in ("model.pt", "model.safetensors"):
        (row,) = _cli_rows(tmp_path / file, capsys)
        _check_json(row, layer, true)


def test_the_issue_numbers():
    # LowRankLinear 12 → 10, rank 2, grown by 1, S set to 0.7.
    for freeze_scales, expected in ((False, [0.7, 0.7, 0.7]), (True, None)):
        torch.manual_seed(0)
        layer = LowRankLinear(12, 10, 2).double()
        layer.grow(1, freeze_scales=freeze_scales)
        with torch.no_grad():
            layer.S.fill_(0.7)
        row = spectral.analyze(layer)[0]
        true = _truth(layer)
        if expected is None:  # the frozen scales are the init's √(10/6) ≈ 1.29
            expected = [(10 / 6) ** 0.5] * 2 + [0.7]
        torch.testing.assert_close(true[:3], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(row.singular_values[:3], true[:3], rtol=1e-12, atol=0)
        assert (row.full_rank, row.hard_rank) == (3, 3)


@pytest.mark.parametrize("kind", LAYERS)
def test_core_full_layer(kind, tmp_path, capsys):
    layer = LAYERS[kind](core="full")
    true = _truth(layer)
    model = nn.ModuleDict({"layer": layer})
    for obj in (model, model.state_dict()):
        _check_row(spectral.analyze(obj)["layer"], layer, true)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    _check_json(_cli_rows(tmp_path / "full.pt", capsys)[0], layer, true)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=LowRankConv2d(2, 4, 3, rank=2),  # W: 4 × 18
            flatten=nn.Flatten(),
            attn=LowRankMultiheadAttention(8, 2, rank=2, batch_first=True),
            fc=LowRankLinear(8, 6, 3),
            head=nn.Linear(6, 3),
        )
    ).double()


def _expected_rows(model) -> dict[str, torch.Tensor]:
    rows = {}
    for name, module in model.named_modules():
        if isinstance(module, (LowRankLinear, LowRankConv2d)):
            rows[name] = _truth(module)
        elif isinstance(module, nn.Linear):
            rows[name] = torch.linalg.svdvals(module.weight.detach().double())
    return rows


def _low_rank_layers(model):
    return [m for m in model.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]


def test_a_model_grown_until_every_layer_is_frozen(tmp_path, capsys):
    """grow_model until every layer is at full rank (conv 4, in_proj and out_proj 8, fc 6;
    those that get there first are frozen, scales frozen or not), then the rest frozen: at
    every step each layer is one row, from the module and from its files."""
    model = _model()
    for step in range(8):
        for seed, layer in enumerate(_low_rank_layers(model)):
            _trained(layer, 100 * step + seed)
        expected = _expected_rows(model)
        torch.save(model.state_dict(), tmp_path / "model.pt")
        save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
        sources = {
            "module": model,
            "torch.save": torch.load(tmp_path / "model.pt", weights_only=True),
            "safetensors": load_file(str(tmp_path / "model.safetensors")),
        }
        for source, obj in sources.items():
            report = spectral.analyze(obj)
            assert sorted(row.name for row in report) == sorted(expected), (step, source)
            for name, true in expected.items():
                torch.testing.assert_close(
                    report[name].singular_values, true, rtol=1e-9, atol=1e-12 * float(true[0])
                )
        if step < 6:
            grow_model(model, 1, freeze_scales=step % 2 == 1)
        elif step == 6:
            for layer in _low_rank_layers(model):
                if layer.active_rank:
                    layer.freeze()
    # The folder save_pretrained writes, through the CLI (model.safetensors inside).
    lowrank_ext.save_pretrained(model, tmp_path / "saved")
    assert cli.main(["analyze", str(tmp_path / "saved"), "--format", "json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    assert sorted(rows) == sorted(expected)
    for name, true in expected.items():
        assert rows[name]["sigma_max"] == pytest.approx(float(true[0]), rel=1e-9)
        assert rows[name]["hard_rank"] == int((true > RTOL * true[0]).sum())
    layers = _low_rank_layers(model)
    assert [layer.frozen_rank for layer in layers] == [4, 8, 8, 6]
    assert [layer.active_rank for layer in layers] == [0, 0, 0, 0]
    assert [layer.S is None for layer in layers] == [False, False, False, True]


def test_oialr_truncated_layers():
    """OIALR's layers (core "full", U and V frozen, truncated to fewer ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=0, frequency=1, cutoff=0.5)
    with torch.no_grad():
        model[0].S.copy_(torch.diag(torch.logspace(0, -2, 16, dtype=torch.float64)))
    assert oialr.step()  # truncated
    assert 1 <= model[0].rank < 16
    _check_row(spectral.analyze(model)["0"], model[0], _truth(model[0]))
    _check_row(spectral.analyze(model.state_dict())["0"], model[0], _truth(model[0]))


def test_half_precision_grown_state_dict():
    """A bfloat16 checkpoint of a grown layer: the factors are rebuilt in the SVD's dtype, the
    row keeps the checkpoint's dtype (and its noise floor)."""
    layer = _linear()
    _grown_three_times(layer)
    half = {key: value.to(torch.bfloat16) for key, value in layer.state_dict().items()}
    reference = _linear()
    reference.load_state_dict(half)  # the bfloat16 values, in float64
    row = spectral.analyze(half)["W"]
    assert row.dtype == "bfloat16"
    true = _truth(reference)
    torch.testing.assert_close(row.singular_values, true, rtol=1e-9, atol=1e-12 * float(true[0]))


def _grown_state_dict():
    layer = _linear()
    _grown_by_two_trained(layer)
    return {f"block.{key}": value for key, value in layer.state_dict().items()}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("block.V_frozen"), r"U, S, V, U_frozen of shapes"),
        (lambda sd: sd.pop("block.V"), r"do not form W = U S Vᵀ .*a grown layer"),
        (lambda sd: sd.update({"block.S": sd["block.S"][:-1]}), r"of shapes \(10, 2\), \(3,\)"),
        (lambda sd: sd.update({"block.S_frozen": sd["block.S"][:2]}), r"S_frozen"),
        (lambda sd: sd.update({"block.U_frozen": sd["block.U_frozen"][:, :0]}), r"\(10, 0\)"),
        (lambda sd: sd.update({"block.V": sd["block.V"][:5]}), r"\(5, 2\)"),
    ],
)
def test_inconsistent_grown_checkpoint_names_the_layer(change, message):
    state_dict = _grown_state_dict()
    change(state_dict)
    with pytest.raises(ValueError, match=rf"layer 'block': .*{message}"):
        spectral.analyze(state_dict)


def test_active_column_inside_the_frozen_span_names_the_layer():
    state_dict = _grown_state_dict()
    state_dict["block.U"] = state_dict["block.U_frozen"][:, :2].clone()
    with pytest.raises(ValueError, match=r"layer 'block': .*project_out"):
        spectral.analyze(state_dict)


def test_frozen_buffers_without_u_frozen_are_refused_not_read_as_matrices():
    layer = _linear()
    state_dict = {"fc.U": layer.U, "fc.S": layer.S, "fc.V": layer.V, "fc.V_frozen": layer.V}
    with pytest.raises(ValueError, match=r"layer 'fc': U, S, V, V_frozen of shapes"):
        spectral.analyze(state_dict)


def _check_on(device: str) -> None:
    """The frozen and active parts composed on `device` (project_out's kernel there), in the
    SVD's float64 and float32: for a CPU module with device=..., then for a module moved there."""
    layer = _linear()
    _grown_three_times(layer)
    true = _truth(layer)
    tolerances = ((torch.float64, 1e-9), (torch.float32, 1e-5))
    for svd_dtype, tolerance in tolerances:
        row = spectral.analyze(layer, svd_dtype=svd_dtype, device=device)[0]
        torch.testing.assert_close(
            row.singular_values, true, rtol=tolerance, atol=tolerance * float(true[0])
        )
    moved = nn.ModuleDict({"layer": layer}).to(device)
    for svd_dtype, tolerance in tolerances:
        row = spectral.analyze(moved, svd_dtype=svd_dtype)["layer"]
        torch.testing.assert_close(
            row.singular_values, true, rtol=tolerance, atol=tolerance * float(true[0])
        )


def test_svd_dtype_and_device_arguments():
    _check_on("cpu")


@pytest.mark.cuda
@requires_cuda
def test_grown_layers_on_cuda():
    _check_on("cuda")
