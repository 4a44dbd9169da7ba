"""Loading of the compiled library lowrank_ext._C, with errors that say how to fix a bad build."""

from __future__ import annotations

import importlib

import torch

_HOW_TO_BUILD = (
    "build it against the installed torch with `pip install --no-build-isolation -e .` "
    "from the source tree (see README.md, 'Quick start')"
)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _matching_build() -> str:
    """What to install instead: the wheel labelled for the running torch, or a source build."""
    backend = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    label = f"{backend}.torch{'.'.join(_major_minor(torch.__version__))}"
    return f"install the lowrank_ext wheel labelled +{label}, or {_HOW_TO_BUILD}"


def load():
    """Import lowrank_ext._C (which registers torch.ops.lowrank_ext.*) and return its build config.

    Raises ImportError when the library is missing or was built against another torch release,
    or with CUDA kernels that the installed torch cannot load: loading it anyway would end in an
    undefined symbol, a missing libc10_cuda/libcudart or a crash, never in a working op.
    """
    try:
        config = importlib.import_module("lowrank_ext._build_config")
    except ImportError as err:
        raise ImportError(f"lowrank_ext's compiled library is not built; {_HOW_TO_BUILD}") from err
    if _major_minor(config.TORCH_VERSION) != _major_minor(torch.__version__):
        raise ImportError(
            f"lowrank_ext was built against torch {config.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {_matching_build()}"
        )
    if config.WITH_CUDA and torch.version.cuda is None:
        raise ImportError(
            f"lowrank_ext was built with CUDA {config.CUDA_VERSION} kernels but torch "
            f"{torch.__version__} is a CPU-only build; install a CUDA {config.CUDA_VERSION} "
            f"build of torch, or {_matching_build()}"
        )
    if config.WITH_CUDA and config.CUDA_VERSION.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise ImportError(
            f"lowrank_ext was built with CUDA {config.CUDA_VERSION} but torch "
            f"{torch.__version__} uses CUDA {torch.version.cuda}; {_matching_build()}"
        )
    try:
        importlib.import_module("lowrank_ext._C")
    except ImportError as err:
        raise ImportError(
            f"lowrank_ext's compiled library failed to load ({err}); {_HOW_TO_BUILD}"
        ) from err
    return config
