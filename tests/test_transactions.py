"""Failed state changes leave nothing half-done (issue 17, item 4).

Every state-changing call gets a fault injected at its last step (the last internal call runs,
then raises); the module, model, optimizer (param_groups order, settings, state tensors) and
the outputs must be exactly as before, bit for bit, and the same objects.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
from torch import nn
from unchanged import assert_unchanged, record

import lowrank_ext
from lowrank_ext import OIALR, LowRankConv2d, LowRankLinear
from lowrank_ext.nn import transaction
from lowrank_ext.nn.dense_weight import DenseWeight
from lowrank_ext.nn.factored import FactoredModule
from lowrank_ext.training import growth, oialr_history, successive

# lowrank_ext.nn.convert is also the function's name in lowrank_ext.nn: take the module itself.
convert_module = importlib.import_module("lowrank_ext.nn.convert")


class Injected(RuntimeError):
    """The fault the tests inject."""


def fail_after(monkeypatch, owner, name: str, calls: int = 1, when=None):
    """Replace owner.name by a wrapper that runs it and then raises Injected on its `calls`-th
    call (counting only calls for which `when(*args)` holds)."""
    original = getattr(owner, name)
    count = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when is None or when(*args, **kwargs):
            count[0] += 1
            if count[0] == calls:
                raise Injected(f"fault injected after {name}")
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return count


def _train(model, optimizer, inputs, steps=2):
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(*inputs)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()
        optimizer.step()


def _low_rank_model():
    torch.manual_seed(0)
    return nn.Sequential(
        LowRankConv2d(2, 4, 3, 2, padding=1),
        nn.Flatten(),
        LowRankLinear(4 * 25, 8, 3),
        nn.Tanh(),
        LowRankLinear(8, 3, 2),
    )


def _inputs():
    return (torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1)),)


def _trained_low_rank():
    model, inputs = _low_rank_model(), _inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer, inputs)
    return model, optimizer, inputs


# ------------------------------------------------------------------------ the helper itself


def test_snapshot_restores_objects_values_grads_and_optimizer():
    model, optimizer, inputs = _trained_low_rank()
    before = record(model, optimizer, inputs)
    with pytest.raises(Injected):
        with transaction.all_or_nothing(model, optimizer, values=[model[2]]):
            model[2].U.data.mul_(2)  # in place, restored from the copy
            model[4].S = nn.Parameter(torch.ones(2))
            model[1] = nn.Identity()
            model.extra = nn.Linear(1, 1)
            model.flag = True
            model[0].U.grad = None
            model[0].V.requires_grad_(False)
            optimizer.param_groups[0]["params"].reverse()
            optimizer.param_groups[0]["lr"] = 1.0
            optimizer.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
            optimizer.state.pop(model[2].S)
            optimizer.state[model[0].U]["exp_avg"] = torch.zeros(1)
            raise Injected("inside")
    assert_unchanged(before, record(model, optimizer, inputs))
    assert not hasattr(model, "flag")


# ------------------------------------------------------------------------ module calls


@pytest.mark.parametrize("method", ["grow", "freeze"])
@pytest.mark.parametrize("index", [0, 2], ids=["conv", "linear"])
def test_grow_and_freeze(monkeypatch, method, index):
    model, optimizer, inputs = _trained_low_rank()
    layer = model[index]
    if method == "freeze":
        layer.grow(1)
    before = record(model, optimizer, inputs)
    # The last step of _refine sets S (the module's last attribute of the new layout).
    fail_after(
        monkeypatch, DenseWeight, "__setattr__", when=lambda m, n, v: m is layer and n == "S"
    )
    with pytest.raises(Injected):
        getattr(layer, method)()
    assert_unchanged(before, record(model, optimizer, inputs))


@pytest.mark.parametrize("offset", [None, -1, 1], ids=["same-rank", "lower", "higher"])
@pytest.mark.parametrize("index", [0, 2], ids=["conv", "linear"])
def test_set_weight(monkeypatch, offset, index):
    model, optimizer, inputs = _trained_low_rank()
    layer = model[index]
    new_rank = None if offset is None else layer.rank + offset
    weight = torch.randn(layer._weight_shape())
    before = record(model, optimizer, inputs)
    fail_after(monkeypatch, FactoredModule, "_copy_svd")
    with pytest.raises(Injected):
        layer.set_weight(weight, rank=new_rank, allow_larger=True)
    assert_unchanged(before, record(model, optimizer, inputs))


def test_load_state_dict(monkeypatch):
    model, optimizer, inputs = _trained_low_rank()
    source = _low_rank_model()
    source[2].grow(2)  # another layout: rank 5 with 3 frozen
    state = source.state_dict()
    before = record(model, optimizer, inputs)
    fail_after(monkeypatch, nn.Module, "_load_from_state_dict", when=lambda m, *a: m is model[2])
    with pytest.raises(Injected):
        model.load_state_dict(state)
    # Modules loaded before the failing one keep what they loaded (as torch's); the failing one,
    # whose copy raised, is restored.
    after = record(model, optimizer, inputs)
    for key in before["tensors"]:
        if key.startswith("2."):
            assert_unchanged({"t": before["tensors"][key]}, {"t": after["tensors"][key]})


# ------------------------------------------------------------------------ model calls


def _dense_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 1, enable_nested_tensor=True),
        nn.Linear(8, 8),
        nn.Linear(8, 3),
    )


def _dense_inputs():
    return (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2)),)


@pytest.mark.parametrize("last", ["_disable_nested_tensor", "_swap"])
def test_convert(monkeypatch, last):
    model, inputs = _dense_model(), _dense_inputs()
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, optimizer, inputs)
    assert model[0].use_nested_tensor
    before = record(model, optimizer, inputs)
    fail_after(monkeypatch, convert_module, last)
    with pytest.raises(Injected):
        lowrank_ext.convert(model, rank=2)
    assert_unchanged(before, record(model, optimizer, inputs))
    assert model[0].use_nested_tensor


def test_merge(monkeypatch):
    model, optimizer, inputs = _trained_low_rank()
    before = record(model, optimizer, inputs)
    fail_after(monkeypatch, convert_module, "_swap")
    with pytest.raises(Injected):
        lowrank_ext.merge(model)
    assert_unchanged(before, record(model, optimizer, inputs))


@pytest.mark.parametrize("grown_before", [False, True])
def test_grow_model_with_optimizer(monkeypatch, grown_before):
    model, optimizer, inputs = _trained_low_rank()
    if grown_before:
        successive.grow_model(model, optimizer=optimizer)
        _train(model, optimizer, inputs)
    before = record(model, optimizer, inputs)
    fail_after(monkeypatch, growth, "update_optimizer")
    with pytest.raises(Injected):
        successive.grow_model(model, optimizer=optimizer)
    assert_unchanged(before, record(model, optimizer, inputs))


# ------------------------------------------------------------------------ OIALR


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)
    )


def _mlp_inputs():
    return (torch.randn(16, 6, generator=torch.Generator().manual_seed(3)),)


def _oialr_record(oialr):
    return {
        "steps": oialr.steps,
        "converted": oialr.converted,
        "ranks": oialr.ranks(),
        "history": [dict(entry) for entry in oialr.history],
        "managed": {name: id(layer) for name, layer in oialr._managed.items()},
    }


def test_oialr_conversion(monkeypatch):
    model, inputs = _mlp(), _mlp_inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=1)
    _train(model, optimizer, inputs, steps=1)
    oialr.step()
    fail_after(monkeypatch, oialr_history, "entry")
    _train(model, optimizer, inputs, steps=1)
    before, state = record(model, optimizer, inputs), _oialr_record(oialr)
    with pytest.raises(Injected):
        oialr.step()
    assert_unchanged(before, record(model, optimizer, inputs))
    assert _oialr_record(oialr) == state


@pytest.mark.parametrize("cutoff", [0.0, 0.6], ids=["same-rank", "rank-drop"])
def test_oialr_update(monkeypatch, cutoff):
    model, inputs = _mlp(), _mlp_inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=0, frequency=2, cutoff=cutoff)
    for _ in range(3):
        _train(model, optimizer, inputs, steps=1)
        oialr.step()
    _train(model, optimizer, inputs, steps=1)
    before, state = record(model, optimizer, inputs), _oialr_record(oialr)
    ranks = oialr.ranks()
    fail_after(monkeypatch, oialr_history, "entry")
    with pytest.raises(Injected):
        oialr.step()
    assert_unchanged(before, record(model, optimizer, inputs))
    assert _oialr_record(oialr) == state
    monkeypatch.undo()
    changed = oialr.step()  # the same update, now without a fault
    assert changed == (cutoff > 0) == (oialr.ranks() != ranks)


@pytest.mark.parametrize("converted", [False, True])
def test_oialr_load_state_dict(monkeypatch, converted):
    model, inputs = _mlp(), _mlp_inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=1, frequency=1, cutoff=0.6)
    for _ in range(3):
        _train(model, optimizer, inputs, steps=1)
        oialr.step()
    saved = oialr.state_dict()

    model, inputs = _mlp(), _mlp_inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fresh = OIALR(model, optimizer, delay=1, frequency=1, cutoff=0.6)
    _train(model, optimizer, inputs, steps=1)
    if converted:
        fresh.step()
        _train(model, optimizer, inputs, steps=1)
    before, state = record(model, optimizer, inputs), _oialr_record(fresh)
    full = {n: min(model.get_submodule(n).weight.shape) for n in saved["ranks"]}
    resized = [n for n, r in saved["ranks"].items() if r < full[n]]
    assert resized  # the checkpoint's ranks dropped: loading resizes those layers
    fail_after(monkeypatch, OIALR, "_resize", calls=len(resized))
    with pytest.raises(Injected):
        fresh.load_state_dict(saved)
    assert_unchanged(before, record(model, optimizer, inputs))
    assert _oialr_record(fresh) == state
