"""Training schemes, acting on the modules of `lowrank_ext.nn` and on optimizers only.

- `successive` (with `growth`): successive refinement in orthogonal subspaces.
- `oialr` (with `oialr_selection`, `oialr_checkpoint`): orthogonality-informed adaptive low-rank
  training, `OIALR`.
- `optimizer_state`: an optimizer's state carried across a change of basis.
"""

from . import growth, optimizer_state, successive
from .oialr import OIALR

__all__ = ["OIALR", "growth", "optimizer_state", "successive"]
