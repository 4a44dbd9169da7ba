"""The process-wide choice of CUDA kernels and build_info: plain settings, checked without a GPU
(which kernels then run on a GPU is tests/test_cuda.py's part)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_ext

ROOT = Path(__file__).resolve().parents[1]


def test_switch_and_its_context_manager():
    previous = lowrank_ext.cuda_kernels()
    assert previous == "cublas"  # the default
    with lowrank_ext.use_cuda_kernels("fused"):
        assert lowrank_ext.cuda_kernels() == "fused"
        assert lowrank_ext.build_info()["cuda_backend"] == "fused"
        with lowrank_ext.use_cuda_kernels("cublas"):
            assert lowrank_ext.cuda_kernels() == "cublas"
        assert lowrank_ext.cuda_kernels() == "fused"
    assert lowrank_ext.cuda_kernels() == previous


def test_context_manager_restores_after_an_error():
    with pytest.raises(KeyError), lowrank_ext.use_cuda_kernels("fused"):
        raise KeyError("inside")
    assert lowrank_ext.cuda_kernels() == "cublas"


@pytest.mark.parametrize("name", ["cutlass", "", "FUSED", "TensorCore", None])
def test_unknown_name_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=f"unknown CUDA kernels {name!r}"):
        lowrank_ext.set_cuda_kernels(name)
    with pytest.raises(ValueError, match=f"unknown CUDA kernels {name!r}"):
        with lowrank_ext.use_cuda_kernels(name):
            pass
    assert lowrank_ext.cuda_kernels() == "cublas"


def test_tensorcore_runs_only_where_built_and_says_what_runs():
    # A build without the tensor-core kernels (CPU-only, or CUDA without CUTLASS headers) refuses
    # the name with the reason, and leaves the choice as it was: never a silent downgrade.
    info = lowrank_ext.build_info()
    if not info["tensorcore_kernels"]:
        reason = "without CUDA" if not info["cuda_kernels"] else "no CUTLASS headers"
        with lowrank_ext.use_cuda_kernels("fused"):
            with pytest.raises(RuntimeError, match=f"'tensorcore'.*not available.*{reason}"):
                lowrank_ext.set_cuda_kernels("tensorcore")
            assert lowrank_ext.cuda_kernels() == "fused"
        return
    with lowrank_ext.use_cuda_kernels("tensorcore"):
        info = lowrank_ext.build_info()
        assert (lowrank_ext.cuda_kernels(), info["cuda_backend"]) == ("tensorcore", "tensorcore")
        assert info["cuda_paths"]["backward"].startswith("tensorcore first pass")
        assert info["cuda_paths"]["forward"].startswith("tensorcore")
    assert lowrank_ext.cuda_kernels() == "cublas"


def test_tensorcore_kernels_need_a_cuda_build():
    info = lowrank_ext.build_info()
    assert isinstance(info["tensorcore_kernels"], bool)
    if not info["cuda_kernels"]:
        assert info["tensorcore_kernels"] is False


def _import_with(value):
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_EXT_CUDA_KERNELS"}
    if value is not None:
        env["LOWRANK_EXT_CUDA_KERNELS"] = value
    code = "import lowrank_ext as l; print(l.cuda_kernels(), l.build_info()['cuda_backend'])"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "cublas"),
        ("", "cublas"),
        ("fused", "fused"),
        (" Fused ", "fused"),
        ("cublas", "cublas"),
    ],
)
def test_environment_variable_sets_the_choice_at_import(value, expected):
    out = _import_with(value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, expected]


def test_environment_variable_tensorcore_fails_loudly_where_not_built():
    out = _import_with("tensorcore")
    if lowrank_ext.build_info()["tensorcore_kernels"]:
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["tensorcore", "tensorcore"]
    else:
        assert out.returncode != 0
        assert "set_cuda_kernels('tensorcore'): not available" in out.stderr


def test_bad_environment_variable_fails_the_import_naming_it():
    out = _import_with("cutlass")
    assert out.returncode != 0
    assert "LOWRANK_EXT_CUDA_KERNELS='cutlass' names no CUDA kernels" in out.stderr


def test_build_info_says_what_runs():
    info = lowrank_ext.build_info()
    assert info["cuda_backend"] == "cublas"
    assert info["cuda_paths"] == {"forward": "cublas", "backward": "cublas"}
    # torch's x86-64 wheels link MKL and export its sgemm_/dgemm_: the CPU kernels call them.
    if torch.backends.mkl.is_available():
        assert info["cpu_gemm"] == "blas"
    else:
        assert info["cpu_gemm"] in ("blas", "aten")
    assert set(info) >= {
        "version",
        "torch_built_against",
        "torch_running",
        "cuda_kernels",
        "cuda_version",
        "cuda_archs",
        "cuda_device_available",
        "tensorcore_kernels",
    }
