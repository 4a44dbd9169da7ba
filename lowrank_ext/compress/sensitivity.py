"""End-to-end sensitivity of a model's output to each layer's truncation error.

For layer i, its whitened truncation at the uniform rank r_i of a probe fraction f (the rank
keeping f of its numbers) replaces the layer's output alone, on a few calibration batches, and
the model's relative output error

    D_i = Σ_b ‖y_b′ − y_b‖² / Σ_b ‖y_b‖²

is divided by the layer's own predicted output error e_i(r_i) (whitening.py): s_i = D_i / e_i is
how much a unit of layer i's error costs at the output. allocation.py weights e_i by it. The
output y is the model's first tensor output (a tensor, the first element of a tuple, the first
value of a mapping such as Hugging Face's last_hidden_state), or what `output` returns;
padding positions are left out as in `calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, ValuesView

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.calibrated import linear_matrix, uniform_rank
from .batches import padding_mask, run_batch, token_rows

__all__ = ["first_tensor", "measure_sensitivity"]


def first_tensor(output) -> torch.Tensor:
    """The first tensor of a model's output: itself, a tuple's first tensor, a mapping's first
    tensor value (Hugging Face ModelOutput: last_hidden_state or logits)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, (Sequence, ValuesView)) and not isinstance(values, str):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(
        f"the model's output ({type(output).__name__}) holds no tensor: pass output= to pick one"
    )


def measure_sensitivity(
    model: nn.Module,
    stats,
    batches: Sequence,
    fraction: float = 0.5,
    *,
    output: Callable | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """{layer name: s_i} for every layer of `stats` (module doc); also stored in
    stats.sensitivity.

    Args:
        model: the model `stats` was collected on (uncompressed).
        stats: CalibrationStats.
        batches: a few model inputs (a list; each as in `calibrate`).
        fraction: the probe fraction f in (0, 1) of each layer's numbers kept.
        output: maps the model's output to the tensor compared (default `first_tensor`).
        progress: a tqdm bar over the layers.

    The model runs in eval mode under no_grad with each layer's output replaced by a forward
    hook; flags are restored and hooks removed afterwards, also on error.
    """
    if not isinstance(fraction, float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"argument 'fraction' must be a float in (0, 1), got {fraction!r}")
    if not batches:
        raise ValueError("argument 'batches' is empty: the sensitivity needs at least one batch")
    pick = output or first_tensor

    def outputs(model, batch):  # float64 rows of the output, real tokens only
        return token_rows(pick(run_batch(model, batch)), padding_mask(batch)).double()

    modules = dict(model.named_modules())
    flags = {module: module.training for module in model.modules()}
    result = {}
    try:
        model.eval()
        with torch.no_grad():
            reference = [outputs(model, batch) for batch in batches]
            scale = sum(float((y * y).sum()) for y in reference)
            for name in tqdm(list(stats.second_moments), desc="sensitivity", disable=not progress):
                layer = modules[name]
                matrix = linear_matrix(name, layer)
                source = stats.factorization(name, matrix)
                rank = max(1, uniform_rank(matrix.shape[1], matrix.shape[0], fraction))
                U, s, V = source.whitened_factors(rank)
                truncated = ((U * s) @ V.mT).to(matrix.dtype)
                bias = layer.bias

                def replace(module, args, out, truncated=truncated, bias=bias):
                    y = args[0] @ truncated.mT
                    return y + bias if bias is not None else y

                handle = layer.register_forward_hook(replace)
                try:
                    error = sum(
                        float(((outputs(model, batch) - y) ** 2).sum())
                        for batch, y in zip(batches, reference)
                    )
                finally:
                    handle.remove()
                predicted = source.predicted_error(rank)
                result[name] = (error / scale) / predicted if predicted > 0 else 0.0
    finally:
        for module, training in flags.items():
            module.training = training
    stats.sensitivity = result
    return result
