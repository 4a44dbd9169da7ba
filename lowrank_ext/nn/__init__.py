"""The modules: LowRankLinear, LowRankConv2d and LowRankMultiheadAttention, their base class
FactoredModule, whole-model conversion (convert, merge, ranks), the portable export (to_plain),
the break-even rank past which a factorization is larger than its dense weight, and parameter
counts (conversion_summary).

Built on the op layer (`lowrank_ext.ops`) only. `lowrank_ext.nn.LowRankLinear` is also the
class's path in models pickled before the package had sub-packages, so it stays importable here.
"""

from .attention import LowRankMultiheadAttention
from .conv import LowRankConv2d
from .convert import convert, merge, ranks
from .dense_weight import DenseView
from .factored import FactoredModule
from .linear import LowRankLinear
from .plain import to_plain
from .summary import ConversionSummary, ModuleSummary, conversion_summary, count_parameters
from .truncation import LargerThanDenseError, break_even_rank, energy_rank, factored_size

__all__ = [
    "ConversionSummary",
    "DenseView",
    "FactoredModule",
    "LargerThanDenseError",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankMultiheadAttention",
    "ModuleSummary",
    "break_even_rank",
    "conversion_summary",
    "convert",
    "count_parameters",
    "energy_rank",
    "factored_size",
    "merge",
    "ranks",
    "to_plain",
]
