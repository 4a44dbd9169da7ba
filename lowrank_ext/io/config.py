"""lowrank_config.json: what `save_pretrained` records of each low-rank module, and the empty
low-rank modules `from_pretrained` builds from those records.

A record (one per outermost low-rank module, by qualified name) holds:

- "class": LowRankLinear, LowRankConv2d or LowRankMultiheadAttention;
- "replaces": the qualified name of the dense class it replaced (`module.__qualname__` behind its
  module path, e.g. "torch.nn.modules.linear.Linear"): the class's default, or transformers'
  Conv1D for a LowRankLinear whose `dense_kind` is "conv1d" (converted from one);
- the sizes that must match the dense module: in_features/out_features (LowRankLinear), the
  convolution's channels, kernel_size, stride, padding, dilation and padding_mode, or the
  attention's embed_dim, num_heads, kdim, vdim, add_bias_kv, add_zero_attn; and "bias";
- "layout" of each factorization: {"core", "rank", "frozen_rank", "frozen_scales"} (the active
  rank is rank − frozen_rank); an attention module has one per projection under "projections".

What does not shape a weight and is not recorded (an attention module's dropout and batch_first)
comes from the base model's module, as `convert` takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import FactoredModule, LowRankConv2d, LowRankLinear, LowRankMultiheadAttention

CONV1D = "transformers.pytorch_utils.Conv1D"  # the dense class of LowRankLinear.dense_kind "conv1d"
_DENSE = {
    LowRankLinear: nn.Linear,
    LowRankConv2d: nn.Conv2d,
    LowRankMultiheadAttention: nn.MultiheadAttention,
}
_CLASSES = {cls.__name__: cls for cls in _DENSE}
_CONV = ("kernel_size", "stride", "padding", "dilation", "padding_mode")
_ATTENTION = ("embed_dim", "num_heads", "kdim", "vdim", "add_bias_kv", "add_zero_attn")


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def low_rank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost low-rank modules of `model` by qualified name (an attention module's
    projections are part of its record), each once."""
    found, inside = {}, set()
    for name, module in model.named_modules():
        if id(module) in inside or not isinstance(module, tuple(_DENSE)):
            continue
        found[name] = module
        inside.update(id(child) for child in module.modules())
    return found


def describe(module: nn.Module) -> dict:
    """The record of one low-rank module (see the module doc)."""
    cls = next(cls for cls in _DENSE if isinstance(module, cls))
    conv1d = cls is LowRankLinear and module.dense_kind == "conv1d"
    record = {"class": cls.__name__, "replaces": CONV1D if conv1d else qualified_name(_DENSE[cls])}
    if cls is LowRankMultiheadAttention:
        record.update({field: _plain(getattr(module, field)) for field in _ATTENTION[:4]})
        record["bias"] = module.out_proj.bias is not None
        record["add_bias_kv"] = module.bias_k is not None
        record["add_zero_attn"] = module.add_zero_attn
        record["projections"] = {name: _factorization(p) for name, p in module.named_children()}
        return record
    if cls is LowRankConv2d:
        record["in_channels"], record["out_channels"] = module.in_channels, module.out_channels
        record.update({field: _plain(getattr(module, field)) for field in _CONV})
    else:
        record["in_features"], record["out_features"] = module.in_features, module.out_features
    record["bias"] = module.bias is not None
    record["layout"] = _layout(module)
    return record


def _factorization(layer: FactoredModule) -> dict:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "layout": _layout(layer),
    }


def _layout(layer: FactoredModule) -> dict:
    return {
        "core": layer.core,
        "rank": layer.rank,
        "frozen_rank": layer.frozen_rank,
        "frozen_scales": layer.S_frozen is not None,
    }


def _plain(value):
    """A JSON value: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- building from a record


class RecordError(ValueError):
    """A record that is malformed or does not fit the model; the message names the module."""


def build(name: str, record, dense: nn.Module) -> nn.Module:
    """An empty low-rank module of the structure `record` describes, in place of `dense` (the
    model's module at `name`): on dense's device, in its dtype, values unset. Checks that the
    record is well formed and fits `dense`; RecordError naming the module otherwise."""
    where = f"module {name!r}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a record (a JSON object), got {record!r}")
    cls = _CLASSES.get(_field(record, "class", str, where))
    if cls is None:
        raise RecordError(
            f"{where}: unknown class {record['class']!r} (this release builds {sorted(_CLASSES)})"
        )
    replaces = _field(record, "replaces", str, where)
    if qualified_name(type(dense)) != replaces:
        raise RecordError(
            f"{where}: the model has a {qualified_name(type(dense))} there, but "
            f"lowrank_config.json records a {cls.__name__} that replaced a {replaces}"
        )
    expected = _dense_fields(cls, dense, where)
    for field, value in expected.items():
        recorded = _field(record, field, type(value), where)
        if recorded != value:
            raise RecordError(
                f"{where} does not fit the model: lowrank_config.json records {field}={recorded!r}"
                f", the model's {type(dense).__name__} has {field}={value!r}"
            )
    like = _first_parameter(dense, where)
    # Built on the meta device at rank 1 (next to no work; the init's random draws are undone),
    # resized to the record's layout, then given storage: the checkpoint provides every value.
    factory = {"device": "meta", "dtype": like.dtype}
    with torch.random.fork_rng(devices=[]):
        module = _build(cls, record, dense, expected, factory, where)
    if cls is LowRankLinear and replaces == CONV1D:
        module.dense_kind = "conv1d"  # merge gives a Conv1D back, as after convert
    return module.to_empty(device=like.device)


def _build(cls, record, dense, expected, factory, where) -> nn.Module:
    if cls is LowRankMultiheadAttention:
        return _attention(record, dense, expected, factory, where)
    if cls is LowRankConv2d:
        module = LowRankConv2d(
            expected["in_channels"],
            expected["out_channels"],
            rank=1,
            bias=expected["bias"],
            **{field: _tuple(expected[field]) for field in _CONV},
            core=_layout_core(record, where),
            **factory,
        )
        _set_layout(module, record, where)
    else:
        module = LowRankLinear(
            expected["in_features"],
            expected["out_features"],
            1,
            bias=expected["bias"],
            core=_layout_core(record, where),
            **factory,
        )
        _set_layout(module, record, where)
    return module


def _dense_fields(cls: type, dense: nn.Module, where: str) -> dict:
    """The fields of a record that the dense module fixes, read from it."""
    bias = getattr(dense, "bias", None) is not None
    if cls is LowRankMultiheadAttention:
        fields = {field: getattr(dense, field) for field in _ATTENTION[:4]}
        fields["bias"] = dense.in_proj_bias is not None
        fields["add_bias_kv"] = dense.bias_k is not None
        fields["add_zero_attn"] = dense.add_zero_attn
        return fields
    if cls is LowRankConv2d:
        if dense.groups != 1:
            raise RecordError(f"{where}: the model's Conv2d has groups={dense.groups}, not 1")
        fields = {"in_channels": dense.in_channels, "out_channels": dense.out_channels}
        fields.update({field: _plain(getattr(dense, field)) for field in _CONV})
        return {**fields, "bias": bias}
    if isinstance(dense, nn.Linear):
        sizes = dense.in_features, dense.out_features
    elif hasattr(dense, "nx") and hasattr(dense, "nf"):  # transformers' Conv1D: weight (in, out)
        sizes = dense.nx, dense.nf
    elif hasattr(dense, "in_features") and hasattr(dense, "out_features"):
        sizes = dense.in_features, dense.out_features
    else:
        raise RecordError(
            f"{where}: cannot read in_features/out_features of the model's "
            f"{type(dense).__name__} (it has neither attributes of that name nor nx/nf)"
        )
    return {"in_features": sizes[0], "out_features": sizes[1], "bias": bias}


def _attention(record, dense, expected, factory, where) -> LowRankMultiheadAttention:
    module = LowRankMultiheadAttention(
        expected["embed_dim"],
        expected["num_heads"],
        1,
        dense.dropout,
        expected["bias"],
        expected["add_bias_kv"],
        expected["add_zero_attn"],
        expected["kdim"],
        expected["vdim"],
        dense.batch_first,
        **factory,
    )
    projections = _field(record, "projections", dict, where)
    names = [name for name, _ in module.named_children()]
    if sorted(projections) != sorted(names):
        raise RecordError(
            f"{where}: records projections {sorted(projections)}, an attention module of these "
            f"sizes has {sorted(names)}"
        )
    for name in names:
        layer, sub = getattr(module, name), f"{where} projection {name!r}"
        projection = projections[name]
        if not isinstance(projection, dict):
            raise RecordError(f"{sub}: expected a record (a JSON object), got {projection!r}")
        for field in ("in_features", "out_features", "bias"):
            value = getattr(layer, field) if field != "bias" else layer.bias is not None
            if _field(projection, field, type(value), sub) != value:
                raise RecordError(
                    f"{sub}: records {field}={projection[field]!r}, an attention module of these "
                    f"sizes has {value!r}"
                )
        built = LowRankLinear(
            layer.in_features,
            layer.out_features,
            1,
            bias=layer.bias is not None,
            core=_layout_core(projection, sub),
            **factory,
        )
        _set_layout(built, projection, sub)
        setattr(module, name, built)
    return module


def _layout_core(record: dict, where: str) -> str:
    layout = _field(record, "layout", dict, where)
    core = _field(layout, "core", str, f"{where} layout")
    if core not in ("diag", "full"):
        raise RecordError(f"{where} layout: 'core' must be 'diag' or 'full', got {core!r}")
    return core


def _set_layout(layer: FactoredModule, record: dict, where: str) -> None:
    layout, inside = record["layout"], f"{where} layout"
    rank = _field(layout, "rank", int, inside)
    frozen = _field(layout, "frozen_rank", int, inside)
    frozen_scales = _field(layout, "frozen_scales", bool, inside)
    try:
        layer._set_layout(rank, frozen, frozen_scales)
    except ValueError as error:
        raise RecordError(f"{inside} {layout!r}: {error}") from None


def _field(record: dict, field: str, kind: type, where: str):
    if field not in record:
        raise RecordError(f"{where}: the field {field!r} is missing")
    value = record[field]
    # JSON has no tuples: a pair or a padding string may stand for either.
    kinds = (list, str) if kind in (list, tuple) else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kinds):
        raise RecordError(f"{where}: the field {field!r} must be {kind.__name__}, got {value!r}")
    return value


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _first_parameter(dense: nn.Module, where: str) -> torch.Tensor:
    for tensor in dense.parameters():
        return tensor
    raise RecordError(f"{where}: the model's {type(dense).__name__} has no parameters")
