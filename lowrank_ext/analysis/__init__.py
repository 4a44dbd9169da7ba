"""Analysis of trained weights, built on the modules of `lowrank_ext.nn`.

- `spectral`: spectra, ranks and the rank-collapse report (`spectral.analyze`), split into
  `loading` (which matrices), `metrics` (the measures of one matrix), `report` (the table) and
  `suggest` (`suggest_ranks`: ranks by the energy rule, a rank_pattern for `convert`).
- `landscape`: loss landscapes along filter-normalized random directions.
"""

from . import landscape, spectral

__all__ = ["landscape", "spectral"]
