"""save_pretrained / from_pretrained refuse what does not fit: missing, corrupt or truncated
files, a newer format, a config that does not match the model. Each error names the file and the
module or key, and the model is left exactly as it was."""

from __future__ import annotations

import json
import sys

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank_ext
from lowrank_ext import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, lin=None, conv=None, att=None):
        super().__init__()
        self.lin = lin or nn.Linear(6, 8)
        self.conv = conv or nn.Conv2d(3, 4, 3, padding=1)
        self.att = att or nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = lowrank_ext.convert(Net(), rank=2, target_modules=["lin", "conv", "att"])
    model.lin.grow(1)
    directory = tmp_path / "checkpoint"
    lowrank_ext.save_pretrained(model, directory)
    return directory


def _snapshot(model: nn.Module):
    modules = [(name, module) for name, module in model.named_modules()]
    return modules, {key: value.clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    modules, state = snapshot
    after = list(model.named_modules())
    assert [name for name, _ in after] == [name for name, _ in modules]
    assert all(a is b for (_, a), (_, b) in zip(after, modules))
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[key], value) for key, value in state.items())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def _refused(directory, error, match, model=None):
    model = Net() if model is None else model
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        lowrank_ext.from_pretrained(model, directory)
    _assert_unchanged(model, before)


def _edit_config(directory, edit) -> None:
    path = directory / "lowrank_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_the_round_trip_these_tests_break_works(saved):
    model = lowrank_ext.from_pretrained(Net(), saved)
    assert (model.lin.rank, model.lin.frozen_rank) == (3, 2)


# ------------------------------------------------------------------- files


def test_missing_directory_and_a_file_in_its_place(saved):
    _refused(saved.parent / "nowhere", FileNotFoundError, r"nowhere: no such directory")
    _refused(saved / "model.safetensors", NotADirectoryError, r"model\.safetensors: is a file")


@pytest.mark.parametrize("name", ["lowrank_config.json", "model.safetensors"])
def test_a_missing_file_or_a_directory_in_its_place(saved, name):
    (saved / name).unlink()
    _refused(saved, FileNotFoundError, rf"checkpoint/{name}: missing")
    (saved / name).mkdir()
    _refused(saved, IsADirectoryError, rf"checkpoint/{name}: is a directory, expected a file")


@pytest.mark.parametrize(
    "text, match",
    [
        (lambda t: t[: len(t) // 2], r"lowrank_config\.json: not a valid JSON file"),
        (lambda t: "\udcff", r"lowrank_config\.json: not a valid JSON file"),
        (lambda t: '{"modules": {}}', r"lowrank_config\.json: not a lowrank_ext config"),
        (lambda t: "[1, 2]", r"lowrank_config\.json: not a lowrank_ext config"),
    ],
)
def test_a_corrupt_or_truncated_config(saved, text, match):
    path = saved / "lowrank_config.json"
    path.write_bytes(text(path.read_text()).encode("utf-8", "surrogateescape"))
    _refused(saved, ValueError, match)


def test_a_config_of_a_newer_format_version(saved):
    _edit_config(saved, lambda c: c.update(format_version=2, library_version="9.0"))
    _refused(
        saved,
        ValueError,
        r"lowrank_config\.json: format version 2 \(written by lowrank_ext '9\.0'\) is newer than "
        r"this release's \(0\.1\.0: format 1\); upgrade lowrank_ext",
    )
    _edit_config(saved, lambda c: c.update(format_version="1"))
    _refused(saved, ValueError, r"lowrank_config\.json: 'format_version' must be an int >= 1")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-10],  # truncated
        lambda data: data[:5],
        lambda data: b"\x00" * 64,
        lambda data: data + b"tail",
    ],
)
def test_a_corrupt_or_truncated_weights_file(saved, damage):
    path = saved / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    _refused(saved, ValueError, r"model\.safetensors: not a readable safetensors file \(.+\)")


def _rewrite_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_weights_lacking_a_key_or_with_one_too_many(saved):
    _rewrite_weights(saved, lambda s: s.pop("head.bias"))
    _refused(saved, ValueError, r"model\.safetensors: keys of the model it lacks: head\.bias")
    _rewrite_weights(
        saved, lambda s: s.update({"head.bias": torch.zeros(2), "extra": torch.ones(1)})
    )
    _refused(saved, ValueError, r"model\.safetensors: keys the model does not have: extra")


def test_weights_disagreeing_with_the_config(saved):
    # The config says lin has rank 3 with 2 frozen; the file's active U of another width.
    _rewrite_weights(saved, lambda s: s.update({"lin.U": torch.zeros(8, 2)}))
    _refused(
        saved,
        ValueError,
        r"model\.safetensors: lin\.U has shape \(8, 2\), the model's is \(8, 1\) \(as "
        r"lowrank_config\.json records it",
    )
    _rewrite_weights(
        saved, lambda s: s.update({"lin.U": torch.zeros(8, 1), "head.weight": torch.zeros(2, 9)})
    )
    _refused(saved, ValueError, r"head\.weight has shape \(2, 9\), the model's is \(2, 8\)")


def test_a_failure_while_reading_or_loading_the_weights_changes_nothing(saved, monkeypatch):
    def unreadable(*args, **kwargs):
        raise OSError("injected read error")

    monkeypatch.setattr(safetensors.torch, "load_file", unreadable)
    _refused(saved, ValueError, r"model\.safetensors: not a readable safetensors file \(injected")
    monkeypatch.undo()

    def failing_load(*args, **kwargs):
        raise RuntimeError("injected load error")

    monkeypatch.setattr(nn.Module, "load_state_dict", failing_load)
    _refused(saved, RuntimeError, "injected load error")


# ------------------------------------------------------------------- config against the model


NOT_FITTING = {
    "another class": (
        lambda: Net(lin=nn.Identity()),
        r"module 'lin': the model has a torch\.nn\.modules\.linear\.Identity there, but "
        r"lowrank_config\.json records a LowRankLinear that replaced a "
        r"torch\.nn\.modules\.linear\.Linear",
    ),
    "other in_features": (
        lambda: Net(lin=nn.Linear(5, 8)),
        r"module 'lin' does not fit the model: lowrank_config\.json records in_features=6, the "
        r"model's Linear has in_features=5",
    ),
    "no bias": (lambda: Net(lin=nn.Linear(6, 8, bias=False)), r"module 'lin' does not fit.*bias"),
    "other padding": (
        lambda: Net(conv=nn.Conv2d(3, 4, 3)),
        r"module 'conv' does not fit the model: lowrank_config\.json records padding=\[1, 1\], "
        r"the model's Conv2d has padding=\[0, 0\]",
    ),
    "other dilation": (
        lambda: Net(conv=nn.Conv2d(3, 4, 3, padding=1, dilation=2)),
        r"module 'conv' does not fit.*dilation=\[1, 1\]",
    ),
    "other heads": (
        lambda: Net(att=nn.MultiheadAttention(8, 4)),
        r"module 'att' does not fit the model: lowrank_config\.json records num_heads=2, the "
        r"model's MultiheadAttention has num_heads=4",
    ),
    "other kdim": (
        lambda: Net(att=nn.MultiheadAttention(8, 2, kdim=5)),
        r"module 'att' does not fit.*kdim",
    ),
    "no such module": (
        lambda: nn.Sequential(nn.Linear(6, 8)),
        r"module 'lin' is not in the model \(Sequential\)",
    ),
}


@pytest.mark.parametrize("case", list(NOT_FITTING))
def test_a_config_that_does_not_fit_the_model_names_the_module(saved, case):
    model, match = NOT_FITTING[case]
    _refused(saved, ValueError, r"lowrank_config\.json: " + match, model())


def _record(name, edit):
    return lambda config: edit(config["modules"][name])


@pytest.mark.parametrize(
    "edit, match",
    [
        (_record("lin", lambda r: r["layout"].update(rank="3")),
         r"module 'lin' layout: the field 'rank' must be int, got '3'"),
        (_record("lin", lambda r: r["layout"].update(frozen_rank=4)),
         r"module 'lin' layout \{.*\}: argument 'frozen_rank' must be in \[0, rank=3\], got 4"),
        (_record("lin", lambda r: r["layout"].update(rank=9)),
         r"module 'lin' layout .*argument 'rank' must be an int in \[1, .*6\]"),
        (_record("lin", lambda r: r["layout"].update(core="low")),
         r"module 'lin' layout: 'core' must be 'diag' or 'full', got 'low'"),
        (_record("lin", lambda r: r.pop("replaces")), r"module 'lin': the field 'replaces' is "
         r"missing"),
        (_record("lin", lambda r: r.update({"class": "LowRankFoo"})),
         r"module 'lin': unknown class 'LowRankFoo'"),
        (_record("conv", lambda r: r.update(bias="yes")), r"module 'conv': the field 'bias' must "
         r"be bool"),
        (_record("att", lambda r: r["projections"].pop("out_proj")),
         r"module 'att': records projections \['in_proj'\], an attention module of these sizes "
         r"has \['in_proj', 'out_proj'\]"),
        (_record("att", lambda r: r["projections"]["in_proj"].update(out_features=8)),
         r"module 'att' projection 'in_proj': records out_features=8, an attention module"),
        (lambda c: c["modules"].update({"att.out_proj": c["modules"]["lin"]}),
         r"module 'att\.out_proj' is recorded inside module 'att'"),
        (lambda c: c.update(modules=[]), r"'modules' must map module names to records"),
    ],
)  # fmt: skip
def test_a_malformed_record_names_the_module_and_field(saved, edit, match):
    _edit_config(saved, edit)
    _refused(saved, ValueError, r"lowrank_config\.json: " + match)


# ------------------------------------------------------------------- saving


def test_save_pretrained_refuses_a_file_path_and_models_it_cannot_describe(tmp_path):
    model = lowrank_ext.convert(Net(), rank=2, target_modules=["lin"])
    file = tmp_path / "taken"
    file.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="taken: exists and is not a directory"):
        lowrank_ext.save_pretrained(model, file)
    assert file.read_text() == "keep me"
    with pytest.raises(ValueError, match=r"\(Net\) has no low-rank module: convert it first"):
        lowrank_ext.save_pretrained(Net(), tmp_path / "dense")
    with pytest.raises(ValueError, match="is itself a LowRankLinear.*wrap it"):
        lowrank_ext.save_pretrained(LowRankLinear(4, 4, 2), tmp_path / "bare")
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module, got dict"):
        lowrank_ext.save_pretrained({}, tmp_path / "dict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing created


def test_a_failed_save_leaves_the_previous_files_whole(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = lowrank_ext.convert(Net(), rank=1, target_modules=["lin"])

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", failing)
    with pytest.raises(OSError, match="disk full"):
        lowrank_ext.save_pretrained(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temporary left


def test_without_safetensors_both_say_what_to_install(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(
        ImportError, match=r"need safetensors: pip install 'lowrank_ext\[safetensors\]'"
    ):
        lowrank_ext.from_pretrained(Net(), saved)
    model = lowrank_ext.convert(Net(), rank=1, target_modules=["lin"])
    with pytest.raises(ImportError, match="need safetensors"):
        lowrank_ext.save_pretrained(model, saved.parent / "new")
    assert not (saved.parent / "new").exists()
