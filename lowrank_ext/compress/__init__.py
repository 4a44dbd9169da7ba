"""Compressing pretrained models so they stay usable.

- batches.py: how a batch is fed to the model, which rows count (padding is left out).
- calibration.py: `calibrate(model, batches)`, each linear layer's input second moment E[x xᵀ].
- whitening.py: truncation in the whitened basis (SVD-LLM), which `convert(calibration=...)` uses.
- sensitivity.py: each layer's end-to-end effect on the model's output.
- allocation.py: a global parameter budget shared by that sensitivity.
- refit.py: `refit(student, teacher, batches)`, the sequential closed-form refit (SVD-LLM 3.3).
- distill.py: `distill(student, teacher, batches)`, recovery by output distillation.

Built on nn (and below); nn's convert reaches this layer only through the `calibration=` object.
"""

from .allocation import allocate
from .batches import run_batch
from .calibration import CalibrationStats, calibrate
from .distill import distill
from .refit import refit
from .sensitivity import first_tensor, measure_sensitivity
from .whitening import WhitenedSVD, whitening_factor

__all__ = [
    "CalibrationStats",
    "WhitenedSVD",
    "allocate",
    "calibrate",
    "distill",
    "first_tensor",
    "measure_sensitivity",
    "refit",
    "run_batch",
    "whitening_factor",
]
