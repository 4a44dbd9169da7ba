"""State dicts of low-rank modules hold tensors only, in every state: safetensors saves and loads
them, the layout (rank, core, frozen part) comes back from the shapes into a module built at
another rank, and a module's load is all-or-nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import lowrank_ext
from lowrank_ext import OIALR, LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.nn import FactoredModule

DATA = Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.usefixtures("one_thread")


def _grown(freeze_scales: bool) -> LowRankLinear:
    layer = LowRankLinear(7, 6, 2)
    layer.grow(2, freeze_scales=freeze_scales, scale_init=0.3)
    return layer


def _frozen(freeze_scales: bool) -> LowRankLinear:
    layer = LowRankLinear(7, 6, 2)
    layer.grow(1, scale_init=-0.4)
    layer.freeze(freeze_scales=freeze_scales)  # no active part left
    return layer


def _conv_grown() -> LowRankConv2d:
    layer = LowRankConv2d(3, 4, 3, 1, padding=1)
    layer.grow(2, freeze_scales=True, scale_init=0.2)
    return layer


def _oialr() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=0, frequency=1, cutoff=0.5, max_drop=0.5)
    loss = model(torch.randn(16, 6)).square().mean()
    loss.backward()
    optimizer.step()
    oialr.step()  # truncates: the layers leave full rank
    assert all(rank < 6 for rank in lowrank_ext.ranks(model).values())
    return model


def _dense_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


# name: (the module in that state, a module of the same class at rank 1 never grown, inputs)
STATES = {
    "plain": (lambda: LowRankLinear(7, 6, 3), lambda: LowRankLinear(7, 6, 1), (4, 7)),
    "full": (
        lambda: LowRankLinear(7, 6, 3, core="full"),
        lambda: LowRankLinear(7, 6, 1, core="full"),
        (4, 7),
    ),
    "grown": (lambda: _grown(False), lambda: LowRankLinear(7, 6, 1), (4, 7)),
    "grown, frozen scales": (lambda: _grown(True), lambda: LowRankLinear(7, 6, 1), (4, 7)),
    "frozen": (lambda: _frozen(False), lambda: LowRankLinear(7, 6, 1), (4, 7)),
    "frozen, frozen scales": (lambda: _frozen(True), lambda: LowRankLinear(7, 6, 1), (4, 7)),
    "conv": (
        lambda: LowRankConv2d(3, 4, 3, 2, padding=1, core="full"),
        lambda: LowRankConv2d(3, 4, 3, 1, padding=1, core="full"),
        (2, 3, 5, 5),
    ),
    "conv grown": (_conv_grown, lambda: LowRankConv2d(3, 4, 3, 1, padding=1), (2, 3, 5, 5)),
    "attention": (
        lambda: LowRankMultiheadAttention(8, 2, 3),
        lambda: LowRankMultiheadAttention(8, 2, 1),
        (5, 2, 8),
    ),
    "attention kdim vdim": (
        lambda: LowRankMultiheadAttention(8, 2, 2, kdim=5, vdim=6, core="full"),
        lambda: LowRankMultiheadAttention(8, 2, 1, kdim=5, vdim=6, core="full"),
        None,
    ),
    "oialr": (_oialr, lambda: lowrank_ext.convert(_dense_mlp(), rank=1, core="full"), (3, 6)),
}


def _build(name: str):
    make, fresh, shape = STATES[name]
    torch.manual_seed(0)
    model = make()
    if shape is None:  # separate key and value sizes
        inputs = (torch.randn(4, 2, 8), torch.randn(3, 2, 5), torch.randn(3, 2, 6))
    else:
        x = torch.randn(shape)
        inputs = (x, x, x) if isinstance(model, LowRankMultiheadAttention) else (x,)
    torch.manual_seed(1)
    return model, fresh(), inputs


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(*inputs)
    return output[0] if isinstance(output, tuple) else output


def _layouts(model: nn.Module) -> dict:
    return {
        name: (m.core, m.rank, m.frozen_rank, m.S_frozen is not None, m.S is not None)
        for name, m in model.named_modules()
        if isinstance(m, FactoredModule)
    }


@pytest.mark.parametrize("state", list(STATES))
def test_state_dict_holds_tensors_only_and_safetensors_round_trips(state, tmp_path):
    model, fresh, inputs = _build(state)
    saved = model.state_dict()
    assert saved and all(torch.is_tensor(value) for value in saved.values())
    assert _layouts(fresh) != _layouts(model)  # the load must change the layout

    save_file(saved, tmp_path / "state.safetensors")
    fresh.load_state_dict(load_file(tmp_path / "state.safetensors"))
    assert _layouts(fresh) == _layouts(model)
    assert torch.equal(_run(fresh, inputs), _run(model, inputs))

    _, other, _ = _build(state)
    save_model(model, tmp_path / "model.safetensors")
    missing, unexpected = load_model(other, tmp_path / "model.safetensors", strict=True)
    assert (missing, unexpected) == (set(), [])
    assert _layouts(other) == _layouts(model)
    assert torch.equal(_run(other, inputs), _run(model, inputs))


# What each state's tensors are: the layout without a record of its own.
LAYOUTS = {
    "plain": {"U": (6, 3), "S": (3,), "V": (7, 3)},
    "full": {"U": (6, 3), "S": (3, 3), "V": (7, 3)},
    "grown": {"U": (6, 2), "S": (4,), "V": (7, 2), "U_frozen": (6, 2), "V_frozen": (7, 2)},
    "grown, frozen scales": {
        "U": (6, 2),
        "S": (2,),
        "V": (7, 2),
        "U_frozen": (6, 2),
        "V_frozen": (7, 2),
        "S_frozen": (2,),
    },
    "frozen": {"S": (3,), "U_frozen": (6, 3), "V_frozen": (7, 3)},
    "frozen, frozen scales": {"U_frozen": (6, 3), "V_frozen": (7, 3), "S_frozen": (3,)},
}


@pytest.mark.parametrize("state", list(LAYOUTS))
def test_each_layout_is_its_tensors_and_loads_back_at_the_saved_shapes(state):
    model, fresh, inputs = _build(state)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == {**LAYOUTS[state], "bias": (6,)}
    fresh.load_state_dict(model.state_dict())
    for name in ("U", "S", "V", "U_frozen", "V_frozen", "S_frozen"):
        tensor = getattr(fresh, name)
        assert (None if tensor is None else tuple(tensor.shape)) == LAYOUTS[state].get(name), name
    # Trainable factors are parameters, the frozen part buffers, as grow/freeze leave them.
    assert {n for n, _ in fresh.named_parameters()} == {"bias"} | (set(LAYOUTS[state]) & set("USV"))
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(_run(fresh, inputs), _run(model, inputs))


def test_a_load_at_the_same_layout_keeps_the_parameter_objects():
    torch.manual_seed(0)
    saved, layer = LowRankLinear(7, 6, 3), LowRankLinear(7, 6, 3)
    objects = [layer.U, layer.S, layer.V, layer.bias]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.load_state_dict(saved.state_dict())
    assert [layer.U, layer.S, layer.V, layer.bias] == objects  # the optimizer's still
    assert optimizer.param_groups[0]["params"][0] is layer.U
    assert torch.equal(layer.weight, saved.weight)


def _fixtures():
    spec = importlib.util.spec_from_file_location("make_v0_1", DATA / "make_v0_1_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_of_0_1_loads_strict_and_saves_as_safetensors(tmp_path):
    saved = torch.load(DATA / "v0_1_state_dict.pt", weights_only=True)
    records = {key: value for key, value in saved.items() if key.endswith("_extra_state")}
    assert len(records) == 12 and records["grown._extra_state"] == {
        "rank": 3,
        "core": "diag",
        "frozen": 1,
        "frozen_scales": True,
    }
    fixtures = _fixtures()
    torch.manual_seed(5)
    model = nn.ModuleDict({name: _at_rank_1(module) for name, module in fixtures.modules().items()})
    result = model.load_state_dict(saved)  # strict
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    outputs = torch.load(DATA / "v0_1_outputs.pt", weights_only=True)
    for name, args in outputs["inputs"].items():
        torch.testing.assert_close(_run(model[name], args), outputs["outputs"][name], msg=name)

    save_file(model.state_dict(), tmp_path / "v0_1.safetensors")
    again = fixtures.modules()
    again.load_state_dict(load_file(tmp_path / "v0_1.safetensors"))
    for name, args in outputs["inputs"].items():
        assert torch.equal(_run(again[name], args), _run(model[name], args)), name


def _at_rank_1(module: nn.Module) -> nn.Module:
    """The same class and sizes, at rank 1 and never grown: the load has to resize it."""
    if isinstance(module, LowRankMultiheadAttention):
        return LowRankMultiheadAttention(
            module.embed_dim,
            module.num_heads,
            1,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            core=module.out_proj.core,
        )
    if isinstance(module, LowRankConv2d):
        return LowRankConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            1,
            padding=module.padding,
            padding_mode=module.padding_mode,
            core=module.core,
        )
    return LowRankLinear(
        module.in_features, module.out_features, 1, bias=module.bias is not None, core=module.core
    )
