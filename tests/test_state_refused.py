"""Loading a checkpoint that cannot fit a low-rank module: an error naming the key and the
module, and the module exactly as it was (objects and values), also when the copy itself fails
after every check has passed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear

NAMES = ("U", "S", "V", "bias", "U_frozen", "V_frozen", "S_frozen")
MODULE = r"module 'enc', a LowRankLinear\(in_features=7, out_features=6\)"
WHERE = r"\(" + MODULE + r"\)"


def _plain(rank: int = 4) -> dict:
    torch.manual_seed(0)
    return {f"enc.{k}": v for k, v in LowRankLinear(7, 6, rank).state_dict().items()}


def _grown(freeze_scales: bool = False, active: bool = True) -> dict:
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 2)
    layer.grow(2, freeze_scales=freeze_scales)
    if not active:
        layer.freeze(freeze_scales=freeze_scales)
    return {f"enc.{k}": v for k, v in layer.state_dict().items()}


def _target() -> nn.ModuleDict:
    torch.manual_seed(3)
    return nn.ModuleDict({"enc": LowRankLinear(7, 6, 3)})


def _snapshot(model: nn.ModuleDict):
    layer = model["enc"]
    objects = {name: getattr(layer, name) for name in NAMES}
    values = {k: v.clone() for k, v in model.state_dict().items()}
    return objects, values


def _assert_unchanged(model: nn.ModuleDict, snapshot) -> None:
    objects, values = snapshot
    layer = model["enc"]
    for name, tensor in objects.items():
        assert getattr(layer, name) is tensor, name
    after = model.state_dict()
    assert after.keys() == values.keys()
    for key, value in values.items():
        assert torch.equal(after[key], value), key
    assert (layer.rank, layer.frozen_rank) == (3, 0)


def _without(state: dict, *names: str) -> dict:
    return {k: v for k, v in state.items() if k.removeprefix("enc.") not in names}


CASES = {
    "S of another rank than U": (
        lambda: {**_plain(), "enc.S": torch.ones(2)},
        r"size mismatch for enc\.S: copying a param with shape \(2,\) .*; "
        + MODULE
        + r" accepts S of shape \(4,\) at this rank",
    ),
    "3-D S": (
        lambda: {**_plain(), "enc.S": torch.ones(4, 4, 4)},
        r"enc\.S: expected 1-D \(core 'diag'\) or 2-D \(core 'full'\), got shape \(4, 4, 4\) "
        + WHERE,
    ),
    "2-D S into a diag module": (
        lambda: {**_plain(), "enc.S": torch.eye(4)},
        r"enc\.S: checkpoint has core='full' but the module has core='diag' "
        r"\(S of shape \(4, 4\)\) " + WHERE,
    ),
    "1-D U": (
        lambda: {**_plain(), "enc.U": torch.ones(6)},
        r"enc\.U: expected a 2-D tensor, got shape \(6,\) " + WHERE,
    ),
    "U of other rows": (
        lambda: {**_plain(), "enc.U": torch.ones(5, 4)},
        r"size mismatch for enc\.U: copying a param with shape \(5, 4\)",
    ),
    "rank over min(in, out)": (
        lambda: {**_plain(), "enc.U": torch.ones(6, 7), "enc.S": torch.ones(7)},
        r"enc\.U: rank 7 \(U of shape \(6, 7\)\) is outside \[1, 6\] " + WHERE,
    ),
    "U_frozen without V_frozen": (
        lambda: _without(_grown(), "V_frozen"),
        r"enc\.V_frozen: missing; a grown layer holds it with enc\.U_frozen " + WHERE,
    ),
    "V_frozen without U_frozen": (
        lambda: _without(_grown(), "U_frozen"),
        r"enc\.V_frozen: present without enc\.U_frozen, which a grown layer holds " + WHERE,
    ),
    "S_frozen of a plain layer": (
        lambda: {**_plain(), "enc.S_frozen": torch.ones(2)},
        r"enc\.S_frozen: present without enc\.U_frozen",
    ),
    "U without V in a grown layer": (
        lambda: _without(_grown(), "V"),
        r"enc\.V: missing while enc\.U is present " + WHERE,
    ),
    "U_frozen of no column": (
        lambda: {**_grown(), "enc.U_frozen": torch.ones(6, 0), "enc.V_frozen": torch.ones(7, 0)},
        r"enc\.U_frozen: holds no component",
    ),
    "S where the layout has none": (
        lambda: {**_grown(freeze_scales=True, active=False), "enc.S": torch.ones(4)},
        r"enc\.S: not part of a layer with this layout \(U_frozen \(6, 4\), V_frozen \(7, 4\), "
        r"S_frozen \(4,\)\) " + WHERE,
    ),
    "a grown layer's S missing": (
        lambda: _without(_grown(), "S"),
        r"enc\.S: missing from the checkpoint of a grown layer",
    ),
    "a list for U": (
        lambda: {**_plain(), "enc.U": [[1.0] * 4] * 6},
        r"enc\.U: the checkpoint holds a list, not a tensor " + WHERE,
    ),
    "an array for S_frozen": (
        lambda: {**_grown(freeze_scales=True), "enc.S_frozen": np.ones(2)},
        r"enc\.S_frozen: the checkpoint holds a ndarray, not a tensor " + WHERE,
    ),
    # torch's own check of the bias comes after the resize to rank 4: the resize is undone.
    "a list for the bias": (
        lambda: {**_plain(), "enc.bias": [0.0] * 6},
        r'parameter named "enc\.bias", expected torch\.Tensor .* received <class \'list\'>',
    ),
    "0.1.0's record disagreeing": (
        lambda: {**_plain(), "enc._extra_state": {"rank": 3, "core": "diag"}},
        r"enc\._extra_state: 0\.1\.0's record \{'rank': 3, 'core': 'diag'\} disagrees with the "
        r"tensors \(\{'rank': 4, 'core': 'diag'\}\) " + WHERE,
    ),
    "0.1.0's record of a grown layer on a plain one": (
        lambda: {
            **_plain(),
            "enc._extra_state": {"rank": 4, "core": "diag", "frozen": 2, "frozen_scales": False},
        },
        r"enc\._extra_state: 0\.1\.0's record .*'frozen': 2.* disagrees",
    ),
    "0.1.0's record not a dict": (
        lambda: {**_plain(), "enc._extra_state": torch.tensor([4])},
        r"enc\._extra_state: expected 0\.1\.0's layout record, a dict with 'rank' and 'core'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_inconsistent_checkpoint_names_key_and_module_and_changes_nothing(case):
    make, match = CASES[case]
    model = _target()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=match):
        model.load_state_dict(make())
    _assert_unchanged(model, before)


@pytest.mark.parametrize("state", ["plain", "grown", "grown, no active part"])
@pytest.mark.parametrize("failure", ["error message", "exception"])
def test_a_failure_at_the_last_step_undoes_the_resize(monkeypatch, state, failure):
    """Every check passes; then nn.Module's copy, the last step, fails after copying."""
    saved = {
        "plain": _plain,
        "grown": _grown,
        "grown, no active part": lambda: _grown(True, active=False),
    }[state]()
    copy = nn.Module._load_from_state_dict

    def failing_copy(module, state_dict, prefix, *args):
        copy(module, state_dict, prefix, *args)
        if not isinstance(module, LowRankLinear):
            return
        assert module.rank == 4  # resized and copied: the last step ran
        if failure == "exception":
            raise OSError("injected")
        args[-1].append("injected")  # error_msgs

    monkeypatch.setattr(nn.Module, "_load_from_state_dict", failing_copy)
    model = _target()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model)
    with pytest.raises(OSError if failure == "exception" else RuntimeError, match="injected"):
        model.load_state_dict(saved)
    _assert_unchanged(model, before)
    assert optimizer.param_groups[0]["params"] == list(model.parameters())


def test_missing_and_unexpected_keys_are_left_to_strict_as_torch_does():
    # load_state_dict decides on them after every module has loaded what it could: strict
    # raises naming the key, strict=False loads the rest (here: resized to rank 4, bias kept).
    partial = _without(_plain(), "bias")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"enc\.bias\""):
        _target().load_state_dict(partial)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"enc\.W\""):
        _target().load_state_dict({**_plain(), "enc.W": torch.ones(6, 7)})
    model = _target()
    bias = model["enc"].bias.clone()
    result = model.load_state_dict(partial, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["enc.bias"], [])
    assert model["enc"].rank == 4 and torch.equal(model["enc"].U, partial["enc.U"])
    assert torch.equal(model["enc"].bias, bias)
