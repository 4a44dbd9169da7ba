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


def load():
    """Import lowrank_ext._C (which registers torch.ops.lowrank_ext.*) and return its build config.

    Raises ImportError when the library is missing or was built against another torch release:
    loading it anyway would end in an undefined symbol or a crash, never in a working op.
    """
    try:
        config = importlib.import_module("lowrank_ext._build_config")
    except ImportError as err:
        raise ImportError(f"lowrank_ext's compiled library is not built; {_HOW_TO_BUILD}") from err
    if _major_minor(config.TORCH_VERSION) != _major_minor(torch.__version__):
        raise ImportError(
            f"lowrank_ext was built against torch {config.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild: {_HOW_TO_BUILD}"
        )
    try:
        importlib.import_module("lowrank_ext._C")
    except ImportError as err:
        raise ImportError(
            f"lowrank_ext's compiled library failed to load ({err}); {_HOW_TO_BUILD}"
        ) from err
    return config
