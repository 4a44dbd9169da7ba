"""The package's layout: layers import only downward (import-linter), `import lowrank_ext` stays
free of matplotlib, the public names and the 0.1 module paths resolve, and models and state_dicts
saved by 0.1 (the flat layout) still load."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import lowrank_ext
from lowrank_ext import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

# The flat modules of 0.1 that moved into sub-packages, each with a name it defined.
MOVED_0_1 = {
    "attention": "LowRankMultiheadAttention",
    "conv": "LowRankConv2d",
    "convert": "merge",
    "landscape": "loss_landscape",
    "oialr": "OIALR",
    "optimizer_state": "change_basis",
    "spectral": "suggest_ranks",
    "spectral_plots": "plot_esd",
    "successive": "fit_successive",
    "successive_plots": "plot_group_norms",
}


def _python(code: str, *, cwd: Path = ROOT, args: tuple[str, ...] = ()):
    """Run `code` in a fresh interpreter that imports the lowrank_ext under test."""
    env = dict(os.environ)
    package_parent = str(Path(lowrank_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_layers_contract_holds():
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]' (it is in [test])")
    assert (ROOT / "pyproject.toml").is_file(), "the contract lives in pyproject.toml"
    # --no-cache: no .import_linter_cache written into the tree.
    result = _python(
        "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())",
        args=("--no-cache", "--no-logo"),
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed:\n{report}"
    assert " 0 broken" in report, report  # and not a run that checked nothing


def test_import_does_not_import_matplotlib():
    result = _python(
        "import sys, lowrank_ext; print(lowrank_ext.__file__); "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'matplotlib'))"
    )
    assert result.returncode == 0, result.stderr
    imported_from, matplotlib_modules = result.stdout.splitlines()
    assert Path(imported_from).resolve() == Path(lowrank_ext.__file__).resolve()
    assert matplotlib_modules == "[]"


def test_public_api():
    from lowrank_ext import (  # noqa: F401
        OIALR,
        LowRankConv2d,
        LowRankLinear,
        LowRankMultiheadAttention,
        build_info,
        convert,
        linear,
        merge,
        project_out,
        ranks,
    )

    assert lowrank_ext.successive is importlib.import_module("lowrank_ext.training.successive")
    assert lowrank_ext.spectral is importlib.import_module("lowrank_ext.analysis.spectral")
    assert lowrank_ext.landscape is importlib.import_module("lowrank_ext.analysis.landscape")
    assert lowrank_ext.reference is importlib.import_module("lowrank_ext.reference")
    assert callable(lowrank_ext.convert) and convert is lowrank_ext.nn.convert
    assert lowrank_ext.nn.LowRankLinear is LowRankLinear  # the class path of 0.1 pickles
    for name in ("analyze", "suggest_ranks", "marchenko_pastur_density", "SpectralReport"):
        assert hasattr(lowrank_ext.spectral, name)
    for name in ("fit_successive", "grow_model", "update_optimizer", "SuccessiveHistory"):
        assert hasattr(lowrank_ext.successive, name)


def test_factored_modules_share_one_base_class():
    from lowrank_ext.nn import FactoredModule

    assert issubclass(LowRankLinear, FactoredModule)
    assert issubclass(LowRankConv2d, FactoredModule)
    shared = ("factors", "grow", "freeze", "reset_parameters", "_load_from_state_dict", "weight")
    for name in shared:
        for cls in (LowRankLinear, LowRankConv2d):
            assert name not in vars(cls), f"{cls.__name__}.{name} should be FactoredModule's"


@pytest.mark.parametrize("old, name", sorted(MOVED_0_1.items()))
def test_module_paths_of_0_1_resolve(old, name):
    module = importlib.import_module(f"lowrank_ext.{old}")
    package, _, _ = module.__name__.rpartition(".")
    assert package in {f"lowrank_ext.{p}" for p in ("nn", "training", "analysis", "plots")}
    assert sys.modules[module.__name__] is module and hasattr(module, name)
    if old != "convert":  # lowrank_ext.convert is the function, as in 0.1
        assert getattr(lowrank_ext, old) is module


def test_old_import_statements_still_work():
    from lowrank_ext.attention import LowRankMultiheadAttention as attention_class
    from lowrank_ext.conv import LowRankConv2d as conv_class
    from lowrank_ext.convert import convert
    from lowrank_ext.nn import LowRankLinear as linear_class
    from lowrank_ext.oialr import OIALR
    from lowrank_ext.successive import SuccessiveHistory

    assert attention_class is LowRankMultiheadAttention
    assert conv_class is LowRankConv2d
    assert linear_class is LowRankLinear
    assert convert is lowrank_ext.convert and OIALR is lowrank_ext.OIALR
    assert SuccessiveHistory is lowrank_ext.training.successive.SuccessiveHistory


def _pickled_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(name)
    names, strings = set(), []
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return names


def _saved_outputs() -> tuple[dict, dict]:
    saved = torch.load(DATA / "v0_1_outputs.pt", weights_only=True)
    return saved["inputs"], saved["outputs"]


def _check_outputs(model) -> None:
    inputs, expected = _saved_outputs()
    assert set(inputs) == set(model.keys())
    with torch.no_grad():
        for name, args in inputs.items():
            output = model[name](*args)
            output = output[0] if isinstance(output, tuple) else output
            torch.testing.assert_close(output, expected[name], msg=name)


def test_whole_model_pickled_by_0_1_loads():
    path = DATA / "v0_1_model.pt"
    # The fixture names the classes by their 0.1 paths: the point of this test.
    assert {
        "lowrank_ext.nn.LowRankLinear",
        "lowrank_ext.conv.LowRankConv2d",
        "lowrank_ext.attention.LowRankMultiheadAttention",
    } <= _pickled_globals(path)
    model = torch.load(path, weights_only=False)
    assert isinstance(model["conv"], LowRankConv2d)
    assert isinstance(model["attention"], LowRankMultiheadAttention)
    assert isinstance(model["attention"].in_proj, LowRankLinear)
    assert (model["grown"].rank, model["grown"].frozen_rank) == (3, 1)
    assert model["capped"].U is None and model["capped"].rank == 3
    _check_outputs(model)


def _fresh_modules() -> torch.nn.ModuleDict:
    """The fixture's modules, built at rank 1 and never grown: loading resizes them."""
    return torch.nn.ModuleDict(
        {
            "linear": LowRankLinear(6, 5, 1),
            "full": LowRankLinear(6, 5, 1, bias=False, core="full"),
            "grown": LowRankLinear(7, 6, 1),
            "capped": LowRankLinear(3, 4, 1),
            "conv": LowRankConv2d(2, 4, 3, 1, padding=1),
            "conv_grown": LowRankConv2d(2, 3, (1, 2), 1, padding=1, padding_mode="circular"),
            "attention": LowRankMultiheadAttention(8, 2, 1),
            "attention_kv": LowRankMultiheadAttention(8, 2, 1, kdim=5, vdim=6, batch_first=True),
        }
    )


def test_state_dict_saved_by_0_1_loads_at_its_ranks():
    saved = torch.load(DATA / "v0_1_state_dict.pt", weights_only=True)
    model = _fresh_modules()
    model.load_state_dict(saved)
    assert lowrank_ext.ranks(model)["grown"] == 3
    assert model["grown"].frozen_rank == 1 and model["grown"].S_frozen is not None
    assert lowrank_ext.ranks(model)["attention.in_proj"] == 3
    _check_outputs(model)
    # Saved again, the checkpoint has 0.1's tensors, keys and shapes, without its records.
    again = model.state_dict()
    assert list(again) == _tensor_keys(saved)
    for key in again:
        assert again[key].shape == saved[key].shape, key


def _tensor_keys(saved: dict) -> list[str]:
    """0.1's keys less its `_extra_state` layout records (dicts), which this release derives."""
    records = [key for key in saved if key.endswith("._extra_state")]
    assert records and all(isinstance(saved[key], dict) for key in records)
    return [key for key in saved if key not in records]


def test_state_dict_layout_is_that_of_0_1():
    spec = importlib.util.spec_from_file_location("make_v0_1", DATA / "make_v0_1_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    saved = torch.load(DATA / "v0_1_state_dict.pt", weights_only=True)
    built = fixtures.modules().state_dict()  # the same modules, built by this release
    assert list(built) == _tensor_keys(saved)
    for key, value in built.items():
        assert value.shape == saved[key].shape and value.dtype == saved[key].dtype, key
