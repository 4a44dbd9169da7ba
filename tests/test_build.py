"""The package reports its build, and refuses clearly to load a missing or mismatched one."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lowrank_ext
from lowrank_ext import _extension, cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    text = (ROOT / "lowrank_ext" / "version.py").read_text()
    assert re.search(r'__version__ = "([^"]+)"', text).group(1) == lowrank_ext.__version__
    assert "version" in re.search(
        r"dynamic = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()
    ).group(1)


def test_build_info_reports_the_build():
    info = lowrank_ext.build_info()
    assert info["version"] == lowrank_ext.__version__
    assert info["torch_built_against"].split("+")[0] == torch.__version__.split("+")[0]
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "lowrank_ext::linear_forward", "CUDA"
    )
    assert info["cuda_kernels"] == has_cuda_kernel
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cuda_version"] == torch.version.cuda
    else:
        assert info["cuda_archs"] == []


def test_every_op_is_registered_with_cpu_kernels():
    for op in ("linear_forward", "linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{op}", "CPU")
    assert torch.ops.lowrank_ext.linear.default._schema.name == "lowrank_ext::linear"


def test_missing_build_says_how_to_build(monkeypatch):
    real_import = _extension.importlib.import_module

    def without_build(name):
        if name == "lowrank_ext._build_config":
            raise ModuleNotFoundError(name)
        return real_import(name)

    monkeypatch.setattr(_extension.importlib, "import_module", without_build)
    with pytest.raises(
        ImportError, match="not built; build it .* `pip install --no-build-isolation -e .`"
    ):
        _extension.load()


def test_torch_version_mismatch_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(ImportError, match=r"built against torch .* but torch 2.99.0 is installed"):
        _extension.load()


def test_cli_info_prints_build_info(capsys):
    assert cli.main(["info"]) == 0
    assert json.loads(capsys.readouterr().out) == lowrank_ext.build_info()


def test_console_script_runs():
    script = Path(sys.executable).with_name("lowrank-ext")
    if not script.exists():
        pytest.fail(f"console script {script} is not installed; reinstall the package")
    result = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["version"] == lowrank_ext.__version__


def _fake_build_config(monkeypatch, **fields):
    config = types.SimpleNamespace(
        TORCH_VERSION=torch.__version__, CUDA_VERSION=None, WITH_CUDA=False, CUDA_ARCHS=""
    )
    vars(config).update(fields)
    real_import = _extension.importlib.import_module
    monkeypatch.setattr(
        _extension.importlib,
        "import_module",
        lambda name: config if name == "lowrank_ext._build_config" else real_import(name),
    )


def test_cuda_build_on_cpu_only_torch_is_refused(monkeypatch):
    _fake_build_config(monkeypatch, WITH_CUDA=True, CUDA_VERSION="13.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(
        ImportError, match=r"CUDA 13.0 kernels but torch .* is a CPU-only build; .*\+cpu\.torch"
    ):
        _extension.load()


def test_cuda_major_mismatch_is_refused(monkeypatch):
    _fake_build_config(monkeypatch, WITH_CUDA=True, CUDA_VERSION="13.0")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(
        ImportError, match=r"built with CUDA 13.0 but torch .* uses CUDA 12.6; .*\+cu126\.torch"
    ):
        _extension.load()
