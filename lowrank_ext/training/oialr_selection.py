"""Which modules OIALR trains, and how a conversion maps their parameters (`OIALR`'s helpers).

`_selection` picks the dense modules to convert and the low-rank ones (core="full") to adopt,
with `lowrank_ext.convert`'s matching rules; `_share_and_map` tells, for one converted module,
which new parameters take the place of each old one in the optimizer and how its state carries
over.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from ..nn.convert import (
    ALL_LINEAR,
    _attention_internals,
    _check_convertible,
    _match,
    _targets,
)
from ..nn.hf_conv1d import is_conv1d, linear_kinds

_FACTORED = (LowRankLinear, LowRankConv2d)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel or torch.compile wrapper."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return _unwrap(model.module)
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.Module):
        return _unwrap(inner)
    return model


def _selection(model, target_modules, exclude_modules, keep_last_dense) -> tuple[list, list]:
    """(dense modules to convert, low-rank core='full' modules to adopt), by qualified name."""
    modules = {name: module for name, module in model.named_modules() if name}
    internal = _attention_internals(modules)
    low_rank = (*_FACTORED, LowRankMultiheadAttention)
    # the projections of a low-rank attention module go with it, as convert's out_proj does
    attention = tuple(
        f"{name}." for name, m in modules.items() if isinstance(m, LowRankMultiheadAttention)
    )
    inside_low_rank = {name for name in modules if attention and name.startswith(attention)}
    if target_modules is None and not keep_last_dense:
        targets = [
            name
            for name, module in modules.items()
            if name not in internal
            and isinstance(module, (*linear_kinds(), nn.Conv2d, nn.MultiheadAttention))
            and getattr(module, "groups", 1) == 1
        ]
    elif target_modules is None or target_modules == ALL_LINEAR:
        targets = _targets(model, modules, internal, target_modules)
    else:
        targets = _match(target_modules, list(modules), "target_modules")
    if target_modules is None or target_modules == ALL_LINEAR:
        targets += [
            name
            for name, module in modules.items()
            if isinstance(module, low_rank)
            and name not in inside_low_rank
            and (target_modules is None or not isinstance(module, LowRankConv2d))
        ]
    if exclude_modules is not None:
        excluded = set(_match(exclude_modules, list(modules), "exclude_modules"))
        targets = [name for name in targets if name not in excluded]
    to_convert, to_adopt = [], []
    for name in targets:
        module = modules[name]
        if isinstance(module, low_rank):
            for child_name, child in _factored_layers(name, module):
                if child.core != "full" or child.frozen_rank:
                    raise ValueError(
                        f"OIALR trains low-rank layers with core='full' and no frozen "
                        f"components; {child_name!r} has core={child.core!r}, "
                        f"frozen={child.frozen_rank} (exclude it, or convert from dense)"
                    )
            to_adopt.append(name)
        else:
            _check_convertible(name, module, internal)
            to_convert.append(name)
    return to_convert, to_adopt


def _factored_layers(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LowRankLinear/LowRankConv2d layers a converted module consists of."""
    if isinstance(module, _FACTORED):
        return [(name, module)]
    return [
        (f"{name}.{child_name}", child)
        for child_name, child in module.named_children()
        if isinstance(child, _FACTORED)
    ]


def _dense_factorizations(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name suffix of the low-rank layer it becomes: the dense weight it factorizes} (a
    Conv1D's as stored, (in, out))."""
    if not isinstance(module, nn.MultiheadAttention):
        return {"": module.weight}
    if module._qkv_same_embed_dim:
        weights = {".in_proj": module.in_proj_weight}
    else:
        weights = {f".{n}": getattr(module, f"{n}_weight") for n in ("q_proj", "k_proj", "v_proj")}
    return {**weights, ".out_proj": module.out_proj.weight}


def _dense_weights(modules) -> list[torch.Tensor]:
    return [w for module in modules for w in _dense_factorizations(module).values()]


def _share_and_map(old: nn.Module, new: nn.Module) -> list[tuple[nn.Parameter, list]]:
    """Make `new` reuse old's bias Parameters, and map each old parameter that is replaced to
    its successors: [(old, [(new_param, how)])], how = ("project", U, V), or
    ("project_transposed", U, V) for a Conv1D's (in, out) weight, or ("chunk", i, n)."""
    if isinstance(old, nn.MultiheadAttention):
        pairs = [(old.out_proj, new.out_proj, old.out_proj.weight)]
        if new.packed_in_proj:
            _share_bias(new.in_proj, old.in_proj_bias)
            pairs.append((None, new.in_proj, old.in_proj_weight))
            transfers = []
        else:
            names = ("q_proj", "k_proj", "v_proj")
            layers = [getattr(new, n) for n in names]
            pairs += [(None, layer, getattr(old, f"{n}_weight")) for n, layer in zip(names, layers)]
            transfers = []
            if old.in_proj_bias is not None:
                chunks = [(layer.bias, ("chunk", i, 3)) for i, layer in enumerate(layers)]
                transfers.append((old.in_proj_bias, chunks))
        for dense_linear, layer, weight in pairs:
            if dense_linear is not None:
                _share_bias(layer, dense_linear.bias)
            transfers.append((weight, [(layer.S, ("project", layer.U, layer.V))]))
        if old.bias_k is not None:
            new.bias_k, new.bias_v = old.bias_k, old.bias_v
        return transfers
    _share_bias(new, old.bias)
    project = "project_transposed" if is_conv1d(old) else "project"
    return [(old.weight, [(new.S, (project, new.U, new.V))])]


def _share_bias(layer: nn.Module, bias) -> None:
    if bias is not None:
        layer.bias = bias  # the same Parameter: its optimizer state stays where it is
