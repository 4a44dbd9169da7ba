"""What a conversion saved or cost: parameter counts of a model's low-rank modules.

`conversion_summary(model)` lists every low-rank module of a model (LowRankLinear,
LowRankConv2d, LowRankMultiheadAttention, whose projections are counted in it) with the dense
class it stands for, its rank, the break-even rank, and its parameter count against the dense
module's, then the model's totals; `str()` of it is a table that ends with the line of PEFT's
`print_trainable_parameters`. `lowrank_ext.convert` logs it (logger "lowrank_ext", INFO), with
the modules it kept dense.

Counts are of the numbers a module holds: its parameters, plus the frozen factors of grown
layers (buffers U_frozen, V_frozen, S_frozen: weights that are not trained). A low-rank
module's dense count is what the dense module holds: its own count with each factorization's
U, S, V replaced by the in·out numbers of the dense matrix (biases, bias_k, bias_v as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .attention import LowRankMultiheadAttention
from .factored import _FACTORS, _FROZEN, FactoredModule
from .truncation import break_even_rank

__all__ = ["ConversionSummary", "ModuleSummary", "conversion_summary", "count_parameters"]

_DENSE_CLASS = {"LowRankLinear": "Linear", "LowRankConv2d": "Conv2d"}


@dataclass(frozen=True)
class ModuleSummary:
    """One converted (or kept dense) module.

    rank and break_even are ints, or {projection: int} for an attention module.
    parameters_before is the dense module's count, parameters_after the module's now (equal
    for a module kept dense).
    """

    name: str
    dense_class: str
    rank: int | dict[str, int]
    break_even: int | dict[str, int]
    parameters_before: int
    parameters_after: int
    kept_dense: bool = False


@dataclass(frozen=True)
class ConversionSummary:
    """Per-module rows and the model's totals (see the module doc for what is counted).

    parameters_before: the model's count with every low-rank module dense; parameters_after:
    its count now; trainable: the numbers in parameters with requires_grad.
    """

    modules: tuple[ModuleSummary, ...]
    parameters_before: int
    parameters_after: int
    trainable: int
    kept_dense: tuple[ModuleSummary, ...] = field(default=())

    def __str__(self) -> str:
        header = ("module", "dense class", "rank", "break-even", "params before", "after", "change")
        rows = [header]
        for row in (*self.modules, *self.kept_dense):
            rank = _per_part(row.rank) + (" (kept dense)" if row.kept_dense else "")
            rows.append(
                (
                    row.name,
                    row.dense_class,
                    rank,
                    _per_part(row.break_even),
                    *_counts(row.parameters_before, row.parameters_after),
                )
            )
        total = _counts(self.parameters_before, self.parameters_after)
        rows.append(("total (model)", "", "", "", *total))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(r, widths))
            ).rstrip()
            for r in rows
        ]
        share = 100 * self.trainable / self.parameters_after if self.parameters_after else 0.0
        lines.append(
            f"trainable params: {self.trainable:,d} || all params: {self.parameters_after:,d} || "
            f"trainable%: {share:.4f}"
        )
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(numbers the model holds, numbers in trainable parameters), shared tensors once.

    The first counts every parameter and the frozen factors of grown low-rank layers.
    """
    parameters = list(model.parameters())
    frozen = {
        id(tensor): tensor
        for module in model.modules()
        if isinstance(module, FactoredModule)
        for tensor in (getattr(module, name) for name in _FROZEN)
        if tensor is not None
    }
    total = sum(p.numel() for p in parameters) + sum(t.numel() for t in frozen.values())
    return total, sum(p.numel() for p in parameters if p.requires_grad)


def conversion_summary(model: nn.Module) -> ConversionSummary:
    """Every low-rank module of `model` with its dense class, rank(s), break-even rank(s) and
    parameter counts before (dense) and after, and the model's totals.

    `print(lowrank_ext.conversion_summary(model))` prints the table; the fields are in
    `ConversionSummary`. Raises TypeError when `model` is not an nn.Module.
    """
    return _summary(model, ())


def _summary(model: nn.Module, kept_dense) -> ConversionSummary:
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    rows, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # a projection of an attention module: counted in it
        if isinstance(module, LowRankMultiheadAttention):
            inside = (f"{name}.",) if name else ("",)
            layers = dict(module.named_children())
            rank = {part: layer.rank for part, layer in layers.items()}
            even = {part: _break_even(layer) for part, layer in layers.items()}
            dense_class = "MultiheadAttention"
        elif isinstance(module, FactoredModule):
            layers = {"": module}
            rank, even = module.rank, _break_even(module)
            dense_class = _DENSE_CLASS.get(type(module).__name__, type(module).__name__)
            if getattr(module, "dense_kind", None) == "conv1d":
                dense_class = "Conv1D"  # converted from transformers' Conv1D
        else:
            continue
        after = count_parameters(module)[0]
        factors = sum(_factor_numel(layer) for layer in layers.values())
        dense = sum(layer.in_features * layer.out_features for layer in layers.values())
        rows.append(ModuleSummary(name, dense_class, rank, even, after - factors + dense, after))
    total, trainable = count_parameters(model)
    before = total + sum(row.parameters_before - row.parameters_after for row in rows)
    return ConversionSummary(tuple(rows), before, total, trainable, tuple(kept_dense))


def _break_even(layer: FactoredModule) -> int:
    return break_even_rank(layer.in_features, layer.out_features, layer.core)


def _factor_numel(layer: FactoredModule) -> int:
    tensors = (getattr(layer, name) for name in _FACTORS + _FROZEN)
    return sum(t.numel() for t in tensors if t is not None)


def _counts(before: int, after: int) -> tuple[str, str, str]:
    change = f"{after / before - 1:+.1%}" if before else ""
    return f"{before:,}", f"{after:,}", change


def _per_part(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{part} {number}" for part, number in value.items())
    return str(value)
