"""lowrank_ext: low-rank, identifiable layers for PyTorch with fused CPU and CUDA kernels."""

from __future__ import annotations

import importlib
import sys

import torch

from . import analysis, compress, io, nn, plots, reference, training
from .analysis import landscape, spectral
from .compress import CalibrationStats, calibrate, distill, refit
from .io import from_pretrained, save_pretrained
from .nn import (
    LowRankConv2d,
    LowRankLinear,
    LowRankMultiheadAttention,
    break_even_rank,
    conversion_summary,
    convert,
    merge,
    ranks,
    to_plain,
)
from .ops import (
    BUILD_CONFIG,
    cpu_buffer_cache,
    cuda_kernels,
    empty_cpu_buffer_cache,
    linear,
    project_out,
    set_cuda_kernels,
    use_cuda_kernels,
)
from .ops import cpu_gemm as _cpu_gemm
from .ops import tensorcore_kernels as _tensorcore_kernels
from .training import OIALR, successive
from .version import __version__

# The modules' paths in the flat layout of 0.1, before the sub-packages: models pickled whole
# name their classes by them (lowrank_ext.conv.LowRankConv2d, ...) and user code imports them,
# so each stays an alias of the module that holds its code now. No file of its own: the tree
# shows only the layers. (lowrank_ext.nn is a package that still exports LowRankLinear.)
_MOVED = {
    "attention": "nn.attention",
    "conv": "nn.conv",
    "convert": "nn.convert",
    "landscape": "analysis.landscape",
    "oialr": "training.oialr",
    "optimizer_state": "training.optimizer_state",
    "spectral": "analysis.spectral",
    "spectral_plots": "plots.spectral",
    "successive": "training.successive",
    "successive_plots": "plots.successive",
}
for _old, _new in _MOVED.items():
    _module = importlib.import_module(f"{__name__}.{_new}")
    sys.modules[f"{__name__}.{_old}"] = _module
    if _old not in globals():  # `convert` stays the function
        globals()[_old] = _module
del _old, _new, _module

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "CalibrationStats",
    "OIALR",
    "__version__",
    "analysis",
    "break_even_rank",
    "build_info",
    "calibrate",
    "compress",
    "conversion_summary",
    "convert",
    "cpu_buffer_cache",
    "cuda_kernels",
    "distill",
    "empty_cpu_buffer_cache",
    "from_pretrained",
    "io",
    "landscape",
    "linear",
    "merge",
    "nn",
    "plots",
    "project_out",
    "ranks",
    "reference",
    "refit",
    "save_pretrained",
    "spectral",
    "set_cuda_kernels",
    "successive",
    "to_plain",
    "training",
    "use_cuda_kernels",
]


# What each choice of set_cuda_kernels runs, forward and backward.
_CUDA_PATHS = {
    "cublas": {"forward": "cublas", "backward": "cublas"},
    "fused": {"forward": "fused", "backward": "fused"},
    "tensorcore": {
        "forward": "tensorcore (float16/bfloat16, r <= 256; else cublas)",
        "backward": "tensorcore first pass (g = dy U and dbias; float16/bfloat16, r <= 256), "
        "the rest cublas",
    },
}


def build_info() -> dict:
    """What the compiled library was built against and which kernels it runs.

    Keys: version; torch_built_against / torch_running; cuda_kernels (bool: CUDA kernels are
    compiled in); cuda_version; cuda_archs (list of "8.0", "9.0+PTX", ...); cuda_backend (which
    CUDA kernels `linear` runs now: "cublas", "fused" or "tensorcore", see `set_cuda_kernels`);
    cuda_paths (what that choice runs: {"forward": ..., "backward": ...}); tensorcore_kernels
    (bool: the tensor-core kernels are compiled in, i.e. a CUDA build that found CUTLASS);
    cpu_gemm (how the CPU kernels multiply: "blas" or "aten"); cpu_buffer_cache_mb (the limit
    of the CPU kernels' buffer cache, see `cpu_buffer_cache`); cuda_device_available.
    """
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "lowrank_ext::linear_forward", "CUDA"
    )
    return {
        "version": __version__,
        "torch_built_against": BUILD_CONFIG.TORCH_VERSION,
        "torch_running": torch.__version__,
        "cuda_kernels": bool(BUILD_CONFIG.WITH_CUDA and has_cuda_kernel),
        "cuda_version": BUILD_CONFIG.CUDA_VERSION,
        "cuda_archs": BUILD_CONFIG.CUDA_ARCHS.split(";") if BUILD_CONFIG.CUDA_ARCHS else [],
        "cuda_backend": cuda_kernels(),
        "cuda_paths": _CUDA_PATHS[cuda_kernels()],
        "tensorcore_kernels": _tensorcore_kernels(),
        "cpu_gemm": _cpu_gemm(),
        "cpu_buffer_cache_mb": cpu_buffer_cache()["limit_bytes"] >> 20,
        "cuda_device_available": torch.cuda.is_available(),
    }
