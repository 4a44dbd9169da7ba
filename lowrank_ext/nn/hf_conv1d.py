"""transformers' `Conv1D` (GPT-2's projections), found without importing transformers.

`Conv1D(nf, nx)` computes y = x W + b with W of shape (nx, nf) = (in, out): an nn.Linear whose
weight is stored transposed. Everything that handles an nn.Linear (convert, merge, OIALR,
spectral.analyze) treats a Conv1D as the linear layer with the (out, in) matrix Wᵀ.

transformers is an optional dependency and importing it takes seconds, so detection looks only
at what is already imported: a Conv1D instance cannot exist before transformers.pytorch_utils is
(unpickling a model imports it too). Only building a Conv1D (`merge`, `to_conv1d`) imports it.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

_MODULE = "transformers.pytorch_utils"


def conv1d_class(*, load: bool = False) -> type | None:
    """transformers' Conv1D class, or None.

    None when transformers is not installed, and also (without `load`) when
    transformers.pytorch_utils has not been imported yet, so that no model can hold a Conv1D.
    `load=True` imports it.
    """
    module = sys.modules.get(_MODULE)
    if module is None and load:
        try:
            module = importlib.import_module(_MODULE)
        except ImportError:
            return None
    return getattr(module, "Conv1D", None)


def is_conv1d(module) -> bool:
    """Whether `module` is a transformers Conv1D (or a subclass)."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def linear_kinds() -> tuple[type, ...]:
    """The classes handled as linear layers: nn.Linear, and Conv1D where transformers is loaded."""
    cls = conv1d_class()
    return (nn.Linear,) if cls is None else (nn.Linear, cls)


def conv1d_matrix(conv1d: nn.Module, what: str) -> torch.Tensor:
    """The (out, in) = (nf, nx) matrix Wᵀ of a Conv1D (a transposed view of its weight).

    Raises ValueError starting with `what` (e.g. "target 'h.0.attn.c_attn' (Conv1D)") when the
    weight is lazy (uninitialized), not a 2-D tensor, or not of shape (nx, nf).
    """
    weight = getattr(conv1d, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{what} is lazy and not initialized: run a forward pass first")
    if not torch.is_tensor(weight) or weight.dim() != 2:
        shape = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"{what} must have a 2-D weight (nx, nf) = (in, out), got {shape}")
    expected = (getattr(conv1d, "nx", weight.shape[0]), getattr(conv1d, "nf", weight.shape[1]))
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"{what} has a weight of shape {tuple(weight.shape)}, but its nx, nf say {expected}"
        )
    return weight.mT
