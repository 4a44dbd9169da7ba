"""How a calibration batch is fed to a model, and which of its rows count.

A batch is a tensor → model(batch), a tuple or list → model(*batch), or a mapping →
model(**batch) (a Hugging Face tokenizer's output). A mapping's 2-D "attention_mask" marks the
real tokens: padding positions of (batch, tokens, features) tensors are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["padding_mask", "run_batch", "token_rows"]


def run_batch(model: nn.Module, batch):
    """model(batch) for a tensor, model(*batch) for a tuple or list, model(**batch) for a
    mapping (a Hugging Face tokenizer's output)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        "argument 'batches': each item must be a tensor, a tuple/list of arguments or a mapping "
        f"of keyword arguments, got {type(batch).__name__}"
    )


def padding_mask(batch) -> torch.Tensor | None:
    """The (batch, tokens) attention_mask of a mapping batch (a Hugging Face tokenizer's
    output), as bool; None for other batches."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows (..., features) → (rows, features) of `x`: with a padding `mask` whose shape
    is x's leading (batch, tokens), only the real tokens' rows."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])
