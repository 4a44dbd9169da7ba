"""Whole-model conversion to low-rank modules and back, with PEFT's module-matching conventions.

- `convert(model, ...)`: replace nn.Linear and transformers' Conv1D, nn.Conv2d (groups=1) and
  nn.MultiheadAttention modules by LowRankLinear, LowRankConv2d and LowRankMultiheadAttention
  (truncated SVD in float64).
- `merge(model)`: every low-rank module back to its dense class, with the same function.
- `ranks(model)`: the rank of every factorized module by qualified name.

Matching rules (module names as `model.named_modules()` gives them; the root is never matched):

- a list (or tuple/set) of strings: a module matches an entry if its name equals the entry or
  ends with "." + entry ("fc" matches "fc" and "block.fc", not "block.fc2"); every entry must
  match some module.
- a string: a regular expression that must match the whole name (`re.fullmatch`).
- "all-linear" (target_modules only): every linear layer (nn.Linear, Conv1D) and
  nn.MultiheadAttention except the output layer.
- None (target_modules only): every supported module (nn.Linear, Conv1D, nn.Conv2d with
  groups=1, nn.MultiheadAttention) except the output layer.

A transformers `Conv1D` (GPT-2's projections: y = x W + b, W stored (in, out)) is a linear layer
whose weight is stored transposed: it is matched like an nn.Linear, becomes a LowRankLinear of
the (out, in) matrix Wᵀ with the same function (`LowRankLinear.from_conv1d`), and merge gives
a Conv1D back. transformers is never imported here (see `hf_conv1d`).

The output layer is `model.get_output_embeddings()` where the model has that method and it
returns a module (Hugging Face models: the LM head, GPT-2's included); otherwise the linear
layer (for None also nn.Conv2d) registered last, outside any attention module. Name it
explicitly to convert it.
`exclude_modules` removes modules from the targets (same list/regex forms). `rank_pattern` maps
keys to ranks overriding `rank`/`energy`: a key equal to a module's full name is that module's;
otherwise a key matches a module if the regex `(.*\\.)?<key>` matches its whole name, and the
first matching key in the dict's order wins. `spectral.suggest_ranks(model)` gives a
rank_pattern of full names, one per module convert targets.

The out_proj of an nn.MultiheadAttention is part of that module: it is converted with it and
cannot be targeted alone.

No silent growth: a rank-r factorization of an out×in weight holds r·(in + out) + r numbers
(core="diag"; + r² for "full") against in·out dense, so it is smaller only up to the break-even
rank ⌊in·out / (in + out + 1)⌋ ("diag"; `break_even_rank`), about in·out / (in + out). Without
`allow_larger=True` a module whose chosen rank is above its break-even rank stays dense (a
UserWarning lists them), and a conversion at full rank (neither rank nor energy) is refused.
`conversion_summary(model)` (nn/summary.py) gives the parameter counts; convert logs it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from .attention import LowRankMultiheadAttention
from .calibrated import CalibratedPlan
from .conv import LowRankConv2d
from .hf_conv1d import conv1d_matrix, is_conv1d, linear_kinds
from .linear import LowRankLinear
from .summary import ModuleSummary, _summary
from .transaction import all_or_nothing
from .truncation import LargerThanDenseError, _check_allow_larger, _check_core

__all__ = ["ALL_LINEAR", "convert", "merge", "ranks", "select_targets"]

ALL_LINEAR = "all-linear"
_LOW_RANK = (LowRankLinear, LowRankConv2d, LowRankMultiheadAttention)
_SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Conv2d with groups=1 and nn.MultiheadAttention"
_LOG = logging.getLogger("lowrank_ext")


def convert(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    core: str = "diag",
    allow_larger: bool = False,
    budget: float | int | None = None,
    calibration=None,
) -> nn.Module:
    """Replace the targeted dense modules of `model` by low-rank ones, in place.

    Args:
        model: the model; its submodules are replaced (not the root itself).
        rank: the rank of every converted factorization (each projection of an attention
            module has its own); None with energy None means full rank, an exact conversion,
            which makes every module larger and so needs allow_larger=True.
        energy: instead of rank, keep per factorization the smallest rank holding this
            fraction of Σσ².
        target_modules: which modules to convert (see the module doc): None, "all-linear", a
            regex or a list of name suffixes.
        exclude_modules: modules not to convert, as a regex or a list of name suffixes.
        rank_pattern: {key: rank} per-module ranks overriding `rank` and `energy`.
        core: "diag" or "full" (S an r×r trainable core, as OIALR trains it).
        allow_larger: also convert modules whose factorization holds more parameters than the
            dense module, i.e. whose rank is above the break-even rank ⌊in·out/(in + out + 1)⌋
            (core "diag"; `lowrank_ext.nn.break_even_rank`; every projection of an attention
            module must fit). False (default): such modules stay dense and a UserWarning lists
            them with their chosen and break-even ranks.
        budget: instead of rank and energy, a global budget for the targeted linear layers
            (nn.Linear, Conv1D): a float in (0, 1], the fraction of their weights' numbers
            (Σ in·out) the factors U, S, V may hold, or an int, that number itself. Without
            calibration every layer keeps the same fraction; with it, `calibration.allocate`
            picks the ranks (see nn/calibrated.py). A layer the budget leaves dense is logged.
        calibration: statistics of the layers' inputs (`lowrank_ext.calibrate(model, batches)`):
            each targeted linear layer is truncated in the whitened basis, minimizing its output
            error ‖(W − W′)X‖_F on the calibration inputs instead of ‖W − W′‖_F (SVD-LLM,
            arXiv:2403.07378), and `energy` is measured there. Any object with the methods of
            the protocol in nn/calibrated.py works.

    Returns the model. The per-module parameter counts before and after, and the model's
    totals, are logged at INFO on the logger "lowrank_ext" (with the modules kept dense);
    `lowrank_ext.conversion_summary(model)` gives them as an object and a table.

    All-or-nothing: every replacement is computed before any is swapped in, and the swap and
    the steps after it are undone on error (`lowrank_ext.nn.transaction`), so on any error the
    model is left as it was. A replacement keeps the replaced module's training
    flag, and a module whose parameters were all frozen stays frozen; hooks registered on the
    replaced module are not carried over. A module registered under several names is replaced
    under all of them. An nn.TransformerEncoder whose attention is converted gets
    `use_nested_tensor = False`: its nested-tensor fast path needs dense attention weights (so
    in eval mode with a padding mask the outputs at padded positions are computed instead of
    zeroed as that path does).

    Raises ValueError naming the argument or the module: rank and energy both given (or
    either with budget); a budget outside (0, 1] or above the targeted weights' size; a
    calibration that does not cover a target (another model's statistics, a layer the
    calibration batches never reached); budget/calibration with a target that is not linear;
    a target, exclude or rank_pattern entry that matches nothing; a targeted module that
    cannot be converted (lazy, on the meta device, a weight holding NaN/inf); a rank out of
    range for a module; a full-rank conversion (neither rank nor energy, for a module
    rank_pattern does not cover) without allow_larger=True. A zero weight converts at rank 1
    under `energy`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    if rank is not None and energy is not None:
        raise ValueError("give at most one of the arguments 'rank' and 'energy'")
    _check_allow_larger(allow_larger)
    _check_core(core)
    modules = {name: module for name, module in model.named_modules() if name}
    targets = select_targets(model, target_modules, exclude_modules)
    per_module = _pattern_ranks(rank_pattern, targets)
    plan = None
    if budget is not None or calibration is not None:  # nn/calibrated.py
        plan = CalibratedPlan(
            targets, modules, rank, energy, rank_pattern, budget, calibration, core
        )
    if rank is None and energy is None and budget is None and not allow_larger:
        _refuse_full_rank([name for name in targets if name not in per_module], modules)

    replacements, kept_dense = {}, []
    for name in targets:
        dense = modules[name]
        module_rank, module_energy = (
            (per_module[name], None) if name in per_module else (rank, energy)
        )
        try:
            if plan is None:
                low_rank = _factorize(dense, module_rank, module_energy, core, allow_larger)
            else:
                low_rank = plan.build(name, dense, module_rank, module_energy, allow_larger)
                if low_rank is None:  # the budget keeps it dense
                    continue
        except LargerThanDenseError as error:
            kept_dense.append(_kept_dense_row(name, dense, error))
            continue
        except ValueError as error:
            raise ValueError(f"cannot convert {name!r} ({type(dense).__name__}): {error}") from None
        _carry_training_state(dense, low_rank)
        replacements[id(dense)] = low_rank
    with all_or_nothing(model):  # the swap and what follows it, undone on any error
        _swap(model, replacements)
        if kept_dense:
            warnings.warn(_kept_dense_message(kept_dense), UserWarning, stacklevel=2)
        if _LOG.isEnabledFor(logging.INFO):
            _LOG.info("lowrank_ext.convert:\n%s", _summary(model, kept_dense))
        _disable_nested_tensor(model)
    return model


def select_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> list[str]:
    """The qualified names of the modules `convert` would replace, in model order (the matching
    rules of the module doc); `lowrank_ext.calibrate` collects statistics for the same ones and
    `spectral.suggest_ranks` suggests ranks for them.

    Raises ValueError as convert does: an entry that matches nothing, a target that cannot be
    converted, nothing left to convert.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    internal = _attention_internals(modules)
    targets = _targets(model, modules, internal, target_modules)
    if exclude_modules is not None:
        if exclude_modules == ALL_LINEAR:
            raise ValueError("argument 'exclude_modules' takes a regex or a list, not 'all-linear'")
        excluded = set(_match(exclude_modules, list(modules), "exclude_modules"))
        targets = [name for name in targets if name not in excluded]
    if not targets:
        output = None
        if target_modules is None or target_modules == ALL_LINEAR:
            output = _output_layer(model, modules, internal, _default_kinds(target_modules)[1])
        kept = (
            f"; {output!r} is the output layer, kept dense unless named in target_modules"
            if output is not None
            else ""
        )
        raise ValueError(
            f"no module to convert in {type(model).__name__}: target_modules={target_modules!r}, "
            f"exclude_modules={exclude_modules!r} leave nothing ({_SUPPORTED} are converted; "
            f"for a single layer use its from_* class method){kept}"
        )
    for name in targets:
        _check_convertible(name, modules[name], internal)
    return targets


def merge(model: nn.Module) -> nn.Module:
    """Replace every low-rank module of `model` by its dense class, in place; returns the model.

    LowRankLinear → nn.Linear, or transformers' Conv1D for one converted from a Conv1D
    (`LowRankLinear.dense_kind`; building it imports transformers, ImportError without it),
    LowRankConv2d → nn.Conv2d, LowRankMultiheadAttention → nn.MultiheadAttention, each with
    the same function (W = U S Vᵀ built once, in the factors' dtype). Training flags carry over
    and a module whose parameters were all frozen stays frozen. A model without low-rank
    modules is returned unchanged. All-or-nothing, as convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, _LOW_RANK):
        raise ValueError(
            f"argument 'model' is itself a {type(model).__name__}, which cannot be replaced in "
            "place: use its to_dense/to_conv2d/to_multihead_attention method"
        )
    replacements, inside_attention = {}, set()
    for module in model.modules():
        if id(module) in inside_attention:
            continue
        if isinstance(module, LowRankMultiheadAttention):
            dense = module.to_multihead_attention()
            inside_attention.update(id(child) for child in module.modules())
        elif isinstance(module, LowRankConv2d):
            dense = module.to_conv2d()
        elif isinstance(module, LowRankLinear):
            dense = module.to_dense()
        else:
            continue
        _carry_training_state(module, dense)
        replacements[id(module)] = dense
    with all_or_nothing(model):
        _swap(model, replacements)
    return model


def ranks(model: nn.Module) -> dict[str, int]:
    """{qualified name: rank} of every LowRankLinear and LowRankConv2d of `model`.

    The projections of a LowRankMultiheadAttention are LowRankLinear children and appear under
    their own names (e.g. "blocks.0.attn.in_proj", "blocks.0.attn.out_proj").
    """
    return {
        name: module.rank
        for name, module in model.named_modules()
        if isinstance(module, (LowRankLinear, LowRankConv2d))
    }


def _attention_internals(modules: Mapping[str, nn.Module]) -> set[str]:
    """Names of the submodules of every nn.MultiheadAttention (its out_proj)."""
    prefixes = [name + "." for name, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    return {name for name in modules if name.startswith(tuple(prefixes))} if prefixes else set()


def _default_kinds(target_modules) -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(module kinds converted, kinds that can be the output layer) for target_modules None or
    "all-linear"."""
    linear = linear_kinds()
    if target_modules is None:
        return (*linear, nn.Conv2d, nn.MultiheadAttention), (*linear, nn.Conv2d)
    return (*linear, nn.MultiheadAttention), linear


def _targets(model, modules, internal, target_modules) -> list[str]:
    if target_modules is None or target_modules == ALL_LINEAR:
        kinds, output_kinds = _default_kinds(target_modules)
        candidates = [
            name
            for name, module in modules.items()
            if name not in internal
            and isinstance(module, kinds)
            and getattr(module, "groups", 1) == 1
        ]
        output = _output_layer(model, modules, internal, output_kinds)
        return [name for name in candidates if name != output]
    return _match(target_modules, list(modules), "target_modules")


def _output_layer(model, modules, internal, kinds) -> str | None:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if isinstance(head, nn.Module):
        return next((name for name, module in modules.items() if module is head), None)
    last = None
    for name, module in modules.items():
        if name not in internal and isinstance(module, kinds):
            last = name
    return last


def _match(spec, names: list[str], argument: str) -> list[str]:
    """The names that `spec` (a full-match regex or a list of suffixes) selects."""
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as error:
            raise ValueError(
                f"argument '{argument}': {spec!r} is not a valid regex: {error}"
            ) from None
        matched = [name for name in names if pattern.fullmatch(name)]
        if not matched:
            raise ValueError(
                f"argument '{argument}': the regex {spec!r} matches no module name in full "
                f"({_some(names)})"
            )
        return matched
    if not isinstance(spec, Iterable) or isinstance(spec, Mapping):
        raise TypeError(
            f"argument '{argument}' must be a regex string or a list of names, got "
            f"{type(spec).__name__}"
        )
    entries = list(spec)
    matched = []
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"argument '{argument}': entries must be non-empty str, got {entry!r}")
        hits = [name for name in names if name == entry or name.endswith("." + entry)]
        if not hits:
            raise ValueError(
                f"argument '{argument}': {entry!r} matches no module (a name equal to it or "
                f"ending in '.{entry}'; {_some(names)})"
            )
        matched += [name for name in hits if name not in matched]
    return [name for name in names if name in matched]


def _some(names: list[str], limit: int = 8, noun: str = "the model's modules") -> str:
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{noun}: {shown}" if names else "the model has no submodules"


def _check_convertible(name: str, module: nn.Module, internal: set[str]) -> None:
    if name in internal:
        attention = name.rsplit(".", 1)[0]
        raise ValueError(
            f"target {name!r} is part of the nn.MultiheadAttention {attention!r}: target the "
            "attention module, which converts its in- and out-projections together"
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(
            f"target {name!r} is an nn.Conv2d with groups={module.groups}; only groups=1 has a "
            "single kernel matrix to factorize"
        )
    if not isinstance(module, (*linear_kinds(), nn.Conv2d, nn.MultiheadAttention)):
        raise ValueError(
            f"target {name!r} is a {type(module).__name__}; convert handles {_SUPPORTED}"
        )
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"target {name!r} is lazy and not initialized: run a forward pass first")
    if is_conv1d(module):
        conv1d_matrix(module, f"target {name!r} ({type(module).__name__})")


def _pattern_ranks(rank_pattern, targets: list[str]) -> dict[str, int]:
    """{target name: rank} from rank_pattern, first matching key in the dict's order."""
    if rank_pattern is None:
        return {}
    if not isinstance(rank_pattern, Mapping):
        raise TypeError(
            f"argument 'rank_pattern' must be a mapping {{key: rank}}, got "
            f"{type(rank_pattern).__name__}"
        )
    patterns = {}
    for key, value in rank_pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"argument 'rank_pattern': keys must be non-empty str, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"argument 'rank_pattern': the rank for {key!r} must be a positive int, "
                f"got {value!r}"
            )
        try:
            patterns[key] = re.compile(rf"(?:.*\.)?(?:{key})")
        except re.error as error:
            raise ValueError(
                f"argument 'rank_pattern': {key!r} is not a valid regex: {error}"
            ) from None
    per_module, used = {}, set()
    for name in targets:
        # A key equal to the full name wins, so that {name: rank} for every module (as
        # spectral.suggest_ranks gives) sets each module's own rank whatever the keys' order.
        key = name if name in patterns else None
        key = key or next((k for k, pattern in patterns.items() if pattern.fullmatch(name)), None)
        if key is not None:
            per_module[name] = rank_pattern[key]
            used.add(key)
    unused = [key for key in patterns if key not in used]
    if unused:
        raise ValueError(
            f"argument 'rank_pattern': {unused} match no module being converted ({_some(targets)}"
            "; spectral.suggest_ranks(model) suggests ranks for exactly those)"
        )
    return per_module


def _factorize(module: nn.Module, rank, energy, core: str, allow_larger: bool) -> nn.Module:
    options = {"core": core, "allow_larger": allow_larger}
    if isinstance(module, nn.MultiheadAttention):
        return LowRankMultiheadAttention.from_multihead_attention(module, rank, energy, **options)
    if isinstance(module, nn.Conv2d):
        return LowRankConv2d.from_conv2d(module, rank, energy, **options)
    if is_conv1d(module):
        return LowRankLinear.from_conv1d(module, rank, energy, **options)
    return LowRankLinear.from_linear(module, rank, energy, **options)


def _refuse_full_rank(names: list[str], modules: Mapping[str, nn.Module]) -> None:
    """A full-rank factorization is always larger than its matrix: say so before any SVD."""
    if not names:
        return
    dense = sum(p.numel() for name in names for p in modules[name].parameters())
    raise ValueError(
        f"convert without rank or energy factorizes at full rank ({_some(names, noun='modules')}"
        f", {dense:,} parameters): an exact conversion, but one that makes every module larger "
        "(a rank-r factorization of an out×in weight holds r·(in + out) + r numbers against "
        "in·out, smaller only up to the break-even rank ⌊in·out / (in + out + 1)⌋, and "
        "min(in, out) is past it). Pass allow_larger=True for the exact conversion, or rank= "
        "or energy= to compress"
    )


def _kept_dense_row(name: str, dense: nn.Module, error: LargerThanDenseError) -> ModuleSummary:
    count = sum(p.numel() for p in dense.parameters())
    kind = type(dense).__name__ + (f".{error.part}" if error.part else "")
    return ModuleSummary(name, kind, error.rank, error.break_even, count, count, kept_dense=True)


def _kept_dense_message(rows: list[ModuleSummary]) -> str:
    lines = [
        f"  {row.name} ({row.dense_class}): rank {row.rank} > break-even rank {row.break_even}"
        for row in rows
    ]
    return (
        f"lowrank_ext.convert kept {len(rows)} module(s) dense: at the chosen rank their "
        "factorization would hold more parameters than the dense weight (U, S, V: "
        "r·(in + out) + r numbers against in·out; smaller only up to the break-even rank). "
        "Pass allow_larger=True to convert them anyway:\n" + "\n".join(lines)
    )


def _carry_training_state(old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    parameters = list(old.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        new.requires_grad_(False)


def _disable_nested_tensor(model: nn.Module) -> None:
    """Turn off the nested-tensor path of every nn.TransformerEncoder with low-rank attention:
    it reads dense attention weights."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), LowRankMultiheadAttention)
            for layer in module.layers
        ):
            module.use_nested_tensor = False


def _swap(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put each replacement in every place its module is registered (shared modules included)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in replacements:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, replacements[id(module)])
