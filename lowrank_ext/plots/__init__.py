"""Every matplotlib figure of lowrank_ext, and the only place that imports matplotlib.

- `successive`: the loss curve with its rank updates, per-group norms against rank, landscapes.
- `spectral`: σ_min histogram, σ spectra and the ESD with the Marchenko–Pastur law.
- `oialr`: the rank of every layer against the training step.

Needs matplotlib (`pip install lowrank_ext[plot]`), imported only when a figure is drawn, so
importing these modules costs nothing.
"""

from . import oialr, spectral, successive

__all__ = ["oialr", "spectral", "successive"]
