"""lowrank_ext: low-rank, identifiable layers for PyTorch with fused CPU and CUDA kernels."""

from __future__ import annotations

import torch

from . import landscape, reference, spectral, successive
from .attention import LowRankMultiheadAttention
from .conv import LowRankConv2d
from .convert import convert, merge, ranks
from .nn import LowRankLinear
from .oialr import OIALR
from .ops import BUILD_CONFIG, linear, project_out
from .version import __version__

__all__ = [
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "OIALR",
    "__version__",
    "build_info",
    "convert",
    "landscape",
    "linear",
    "merge",
    "project_out",
    "ranks",
    "reference",
    "spectral",
    "successive",
]


def build_info() -> dict:
    """What the compiled library was built against and which kernels it carries."""
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
        "cuda_device_available": torch.cuda.is_available(),
    }
