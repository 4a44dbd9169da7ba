"""The modules: LowRankLinear, LowRankConv2d and LowRankMultiheadAttention, their base class
FactoredModule, and whole-model conversion (convert, merge, ranks, to_plain).

Built on the op layer (`lowrank_ext.ops`) only. `lowrank_ext.nn.LowRankLinear` is also the
class's path in models pickled before the package had sub-packages, so it stays importable here.
"""

from .attention import LowRankMultiheadAttention
from .conv import LowRankConv2d
from .convert import convert, merge, ranks
from .factored import FactoredModule, energy_rank
from .linear import LowRankLinear
from .plain import to_plain

__all__ = [
    "FactoredModule",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "convert",
    "energy_rank",
    "merge",
    "ranks",
    "to_plain",
]
