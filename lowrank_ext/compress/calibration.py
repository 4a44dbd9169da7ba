"""`calibrate(model, batches)`: the second moment E[x xᵀ] of every targeted linear layer's input.

The statistics are what whitened truncation (whitening.py) needs: convert(calibration=stats)
truncates each layer where its output error on these inputs is smallest. They are summed in
float64 as the batches stream through the model (memory O(in²) per layer, never the inputs
themselves), on the device of each layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.calibrated import linear_matrix
from ..nn.convert import select_targets
from ..nn.hf_conv1d import linear_kinds
from .allocation import allocate
from .batches import padding_mask, run_batch, token_rows
from .sensitivity import measure_sensitivity
from .whitening import WhitenedSVD

__all__ = ["CalibrationStats", "calibrate"]


def _fingerprint(matrix: torch.Tensor) -> tuple:
    """An identity check of a weight: its shape, Σw, Σw² and Σ w·ρ in float64, where ρ is a
    fixed pseudo-random matrix, so that a permutation of the entries (reordered hidden units)
    changes it too; compared with a tolerance, so that moving the model between devices does not.
    """
    m = matrix.detach().to(device="cpu", dtype=torch.float64)
    probe = torch.rand(m.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (tuple(m.shape), float(m.sum()), float((m * m).sum()), float((m * probe).sum()))


@dataclass
class CalibrationStats:
    """Input statistics of a model's linear layers, from `calibrate`.

    Attributes:
        second_moments: {layer name: E[x xᵀ]}, (in, in) float64 on the layer's device.
        rows: {layer name: the number of input rows (tokens, samples) the layer saw}.
        weights: {layer name: (shape, Σw, Σw², Σw·ρ) of its (out, in) weight at calibration}, to
            refuse statistics used on another model.
        ridge: λ of the whitening's regularization (whitening.py).
        sensitivity: {layer name: end-to-end output error per unit of the layer's own
            predicted output error} when measured (`calibrate(sensitivity=...)`), else None;
            with it `allocate` shares a budget by it (allocation.py), without it uniformly.
        fallbacks: {layer name: ranks} where the plain truncated SVD beat the whitened one on
            the calibration data and was used instead.

    It is the `calibration=` object of `lowrank_ext.convert` (protocol in nn/calibrated.py).
    """

    second_moments: dict[str, torch.Tensor]
    rows: dict[str, int]
    weights: dict[str, tuple]
    ridge: float = 1e-6
    sensitivity: dict[str, float] | None = None
    fallbacks: dict[str, list[int]] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def factorization(self, name: str, matrix: torch.Tensor) -> WhitenedSVD:
        """The whitened SVD of layer `name` with weight `matrix` (out, in).

        Raises ValueError naming the layer when these statistics do not cover it or were
        collected on another weight (another model, or this one changed since calibrate).
        """
        if name not in self.second_moments:
            raise ValueError(
                f"argument 'calibration' has no statistics for layer {name!r} (it covers "
                f"{len(self.second_moments)} layers: {', '.join(list(self.second_moments)[:6])}"
                "...): calibrate with the same target_modules, on this model"
            )
        recorded = self.weights[name]
        now = _fingerprint(matrix)
        if recorded[0] != now[0] or not all(
            math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(recorded[1:], now[1:])
        ):
            raise ValueError(
                f"argument 'calibration': the statistics of layer {name!r} were collected on "
                f"another weight (shape {recorded[0]}, now {now[0]}; or different values): "
                "statistics from another model, or the model changed after calibrate"
            )
        key = (name, str(matrix.device))
        if key not in self._cache:  # the same weight: its decomposition is reused

            def fell_back(rank: int) -> None:
                self.fallbacks.setdefault(name, []).append(rank)
                warnings.warn(
                    f"layer {name!r} at rank {rank}: the plain truncated SVD has a smaller "
                    "output error on the calibration inputs than the whitened one; using it",
                    UserWarning,
                    stacklevel=4,
                )

            moment = self.second_moments[name]
            self._cache[key] = WhitenedSVD(matrix, moment, self.ridge, on_fallback=fell_back)
        return self._cache[key]

    def allocate(self, layers, budget: int, core: str) -> dict[str, int | None]:
        """Ranks under `budget` (protocol of nn/calibrated.py): by measured sensitivity when
        there is one (allocation.py), else the same fraction in every layer."""
        return allocate(layers, budget, core, self.sensitivity)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    target_modules=None,
    exclude_modules=None,
    ridge: float = 1e-6,
    sensitivity: float | None = None,
    sensitivity_batches: int = 2,
    output=None,
    progress: bool = True,
) -> CalibrationStats:
    """Run `model` over `batches` and collect every targeted linear layer's input statistics.

    Args:
        model: the model to compress, on the device its batches are on.
        batches: an iterable (read once) of model inputs: a tensor → model(batch), a tuple or
            list → model(*batch), a mapping → model(**batch) (a Hugging Face tokenizer's
            output). A mapping with a 2-D "attention_mask" counts only the real tokens of
            layer inputs shaped (batch, tokens, features): padding is left out.
        target_modules, exclude_modules: the layers, as for `lowrank_ext.convert` (the same
            selection); each must be an nn.Linear or a transformers Conv1D.
        ridge: λ of the whitening's regularization C + λ·mean(diag C)·I (whitening.py).
        sensitivity: a probe fraction f in (0, 1) to also measure each layer's end-to-end
            sensitivity (sensitivity.py) on the first `sensitivity_batches` batches, which a
            `convert(budget=...)` then shares the budget by (allocation.py); None (default):
            not measured, a budget is shared uniformly. Costs one forward over those batches
            per layer.
        output: the model output's tensor the sensitivity compares (default: the first).
        progress: show a tqdm bar over the batches.

    Returns CalibrationStats: per layer E[x xᵀ] (in, in) float64, summed in float64 over all
    rows (the batch and sequence dimensions flattened), and the row count.

    The model runs in eval mode under torch.no_grad(); every module's training flag is
    restored afterwards and the hooks removed, also on error. Outputs are not changed.

    Raises ValueError naming the argument or layer: `batches` empty; a batch whose input to a
    layer holds NaN or inf; a layer that no batch reached; a target that is not linear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"argument 'ridge' must be a number ≥ 0, got {ridge!r}")
    layers = _linear_targets(model, target_modules, exclude_modules)
    sums = {name: None for name in layers}
    rows = dict.fromkeys(layers, 0)
    shared = {}  # per batch: one Xᵀ X per distinct input tensor (query, key, value share one)
    batch_index, current_mask = [0], [None]

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
            if key not in shared:
                flat = token_rows(x, current_mask[0])
                if not torch.isfinite(flat).all():
                    raise ValueError(
                        f"argument 'batches': batch {batch_index[0]} gives layer {name!r} an "
                        "input with NaN or inf values"
                    )
                flat = flat.double()
                shared[key] = (x, flat.mT @ flat, flat.shape[0])
            _, moment, count = shared[key]
            sums[name] = moment.clone() if sums[name] is None else sums[name].add_(moment)
            rows[name] += count

        return accumulate

    if sensitivity is not None:
        if not isinstance(sensitivity, float) or not 0.0 < sensitivity < 1.0:
            raise ValueError(
                f"argument 'sensitivity' must be a float in (0, 1) or None, got {sensitivity!r}"
            )
        if (
            isinstance(sensitivity_batches, bool)
            or not isinstance(sensitivity_batches, int)
            or (sensitivity_batches < 1)
        ):
            raise ValueError(
                f"argument 'sensitivity_batches' must be a positive int, "
                f"got {sensitivity_batches!r}"
            )
    flags = {module: module.training for module in model.modules()}
    handles = []
    seen, kept = 0, []
    try:  # every argument is checked above: from here on, the finally removes the hooks
        handles.extend(layers[name].register_forward_pre_hook(hook(name)) for name in layers)
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
                batch_index[0], current_mask[0] = seen, padding_mask(batch)
                run_batch(model, batch)
                shared.clear()
                if sensitivity is not None and len(kept) < sensitivity_batches:
                    kept.append(batch)
                seen += 1
    finally:
        shared.clear()
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    if seen == 0:
        raise ValueError("argument 'batches' is empty: calibration needs at least one batch")
    missing = [name for name, count in rows.items() if count == 0]
    if missing:
        raise ValueError(
            f"argument 'batches': {len(missing)} targeted layer(s) never received an input "
            f"from the {seen} calibration batch(es): {', '.join(missing[:8])}; exclude them "
            "(exclude_modules) or calibrate with inputs that reach them"
        )
    stats = CalibrationStats(
        second_moments={name: sums[name] / rows[name] for name in layers},
        rows=rows,
        weights={
            name: _fingerprint(linear_matrix(name, module)) for name, module in layers.items()
        },
        ridge=float(ridge),
    )
    if sensitivity is not None:
        measure_sensitivity(model, stats, kept, sensitivity, output=output, progress=progress)
    return stats


def _linear_targets(model, target_modules, exclude_modules) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    layers = {}
    for name in select_targets(model, target_modules, exclude_modules):
        module = modules[name]
        if not isinstance(module, linear_kinds()):
            raise ValueError(
                f"calibrate covers linear layers (nn.Linear, Conv1D), but target {name!r} is "
                f"a {type(module).__name__}: exclude it (exclude_modules)"
            )
        layers[name] = module
    return layers
