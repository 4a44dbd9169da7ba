"""Reading the weight matrices out of a module, a state_dict or a tensor, for
`lowrank_ext.analysis.spectral.analyze` (which matrices, and how each is read: see its module
docstring).

Each matrix becomes a `_Layer`: a name, a kind and an operator, either `_Dense` (one matrix, or
the blocks of a grouped convolution) or `_Factored` (the tensors a factored layer stores, never
multiplied out). A factored layer is read as the module's own tensors or the state dict's
(U, S, V and, after rank growth, U_frozen, V_frozen, S_frozen: `lowrank_ext.nn.checkpoint`), and
`effective_factors` turns either into the U, S, V of W = U S Vᵀ that forward uses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.checkpoint import FACTORS, FROZEN, effective_factors
from ..nn.factored import FactoredModule
from ..nn.hf_conv1d import conv1d_class


class _Dense(NamedTuple):
    blocks: torch.Tensor  # (g, rows, cols): the block-diagonal operator diag(blocks[0], …)


class _Factored(NamedTuple):
    # The stored tensors by name, absent ones left out: U, S, V, and U_frozen, V_frozen,
    # S_frozen for a grown layer (the layout of lowrank_ext.nn.checkpoint).
    parts: dict[str, torch.Tensor]


class _Layer(NamedTuple):
    name: str
    kind: str
    operator: _Dense | _Factored


def _dense(matrix: torch.Tensor, groups: int = 1) -> _Dense:
    return _Dense(matrix.reshape(groups, matrix.shape[0] // groups, math.prod(matrix.shape[1:])))


def _factors_of(module: nn.Module) -> _Factored | None:
    """The factored layer a module holds: a FactoredModule's tensors whatever its growth state
    (U may be None: frozen at full rank), or 2-D U, V and an S (r,) or (r, r) of another
    module shaped like one; None otherwise."""
    if isinstance(module, FactoredModule):
        return _Factored(_present(module, FACTORS + FROZEN))
    parts = _present(module, FACTORS)
    if len(parts) < 3 or parts["U"].dim() != 2 or parts["V"].dim() != 2:
        return None
    return _Factored(parts) if parts["S"].dim() in (1, 2) else None


def _present(module: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    tensors = {name: getattr(module, name, None) for name in names}
    return {name: tensor for name, tensor in tensors.items() if torch.is_tensor(tensor)}


def _check_factors(name: str, parts: dict[str, torch.Tensor]) -> None:
    """ValueError naming the layer unless `parts` form a layout: plain U (N, r), S (r,) or
    (r, r), V (M, r) with r ≥ 1, or grown (lowrank_ext.nn.checkpoint's layout)."""
    shapes = {key: tuple(tensor.shape) for key, tensor in parts.items()}
    if _expected_shapes(shapes) != shapes:
        expected = (
            "U_frozen (N, f), V_frozen (M, f) with f ≥ 1, U (N, a) and V (M, a) when a > 0 "
            "components are active, and S (f + a,), or S_frozen (f,) and S (a,) when the frozen "
            "scales are frozen too: a grown layer"
            if set(shapes) & set(FROZEN)
            else "(N, r), (r,) or (r, r), (M, r) with r ≥ 1"
        )
        raise ValueError(
            f"layer {name!r}: {', '.join(shapes)} of shapes {', '.join(map(str, shapes.values()))} "
            f"do not form W = U S Vᵀ (expected {expected})"
        )


def _expected_shapes(shapes: dict[str, tuple]) -> dict[str, tuple] | None:
    """The shapes a layout with these U, U_frozen and V, V_frozen needs, or None."""
    frozen, U, V = shapes.get("U_frozen"), shapes.get("U"), shapes.get("V")
    if frozen is None:
        if U is None or V is None or len(U) != 2 or len(V) != 2 or U[1] < 1:
            return None
        core = (U[1],) if len(shapes.get("S", ())) == 1 else (U[1], U[1])
        return {"U": U, "S": core, "V": (V[0], U[1])}
    V_frozen = shapes.get("V_frozen")
    if len(frozen) != 2 or V_frozen is None or len(V_frozen) != 2 or frozen[1] < 1:
        return None
    (rows, f), cols = frozen, V_frozen[0]
    a = U[1] if U is not None and len(U) == 2 else 0
    expected = {"U_frozen": frozen, "V_frozen": (cols, f)}
    if U is not None or V is not None:
        expected.update(U=(rows, a), V=(cols, a))
    if "S_frozen" in shapes:
        expected["S_frozen"] = (f,)
        if a:
            expected["S"] = (a,)
    else:
        expected["S"] = (f + a,)
    return expected


def _effective(parts: dict[str, torch.Tensor], **to) -> tuple[torch.Tensor, ...]:
    """U, S, V of W = U S Vᵀ from a layer's checked parts, each converted `to` first."""
    converted = {key: tensor.detach().to(**to) for key, tensor in parts.items()}
    return effective_factors(**(dict.fromkeys(FACTORS + FROZEN) | converted))


def _module_layers(model: nn.Module) -> Iterator[_Layer]:
    root = type(model).__name__
    conv1d = conv1d_class() or ()  # isinstance(x, ()) is False: no transformers, no Conv1D
    for name, module in model.named_modules():
        name = name or root
        kind = type(module).__name__
        factors = _factors_of(module)
        if factors is not None:
            yield _Layer(name, kind, factors)
        elif isinstance(module, nn.MultiheadAttention):
            yield from _attention_layers(name, module)
        elif isinstance(module, nn.modules.conv._ConvNd):
            yield _Layer(name, kind, _dense(_weight_of(name, module), module.groups))
        elif isinstance(module, conv1d):
            # y = x W + b with W stored (in, out): the layer's (out, in) matrix is Wᵀ
            yield _Layer(name, kind, _dense(_weight_of(name, module).mT))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag)) or (
            parametrize.is_parametrized(module, "weight") and module.weight.dim() >= 2
        ):
            yield _Layer(name, kind, _dense(_weight_of(name, module)))


def _weight_of(name: str, module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is lazy and not initialized yet: run one "
            "forward pass before analysing it"
        )
    return weight


def _attention_layers(name: str, module: nn.MultiheadAttention) -> Iterator[_Layer]:
    kind = type(module).__name__
    if module.in_proj_weight is not None:
        projections = module.in_proj_weight.chunk(3)
    else:
        projections = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    for letter, weight in zip("qkv", projections):
        yield _Layer(f"{name}.{letter}_proj", f"{kind}.{letter}_proj", _dense(weight))


def _flatten(mapping: Mapping, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in mapping.items():
        if not isinstance(value, Mapping):
            flat[f"{prefix}{key}"] = value
        elif not str(key).startswith("optim"):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _state_dict_layers(state_dict: Mapping) -> Iterator[_Layer]:
    tensors = {
        key: value
        for key, value in _flatten(state_dict).items()
        if torch.is_tensor(value) and value.is_floating_point()
    }
    # A factored layer's prefix: a plain triple <prefix>U, S, V, or any frozen part of a grown
    # one; all its parts are read together (a missing one is an error naming the layer, not a
    # part read as a matrix of its own).
    factored = {}
    for key in tensors:
        for part in ("U", *FROZEN):
            if key == part or key.endswith("." + part):
                prefix = key[: -len(part)]
                grown = any(prefix + name in tensors for name in FROZEN)
                if grown or all(prefix + name in tensors for name in FACTORS):
                    factored.update(
                        (prefix + name, prefix)
                        for name in FACTORS + FROZEN
                        if prefix + name in tensors
                    )
    # Rows in the state_dict's order; a factored layer where the first of its parts is.
    emitted = set()
    for key, tensor in tensors.items():
        prefix = factored.get(key)
        if prefix is not None:
            if prefix not in emitted:
                emitted.add(prefix)
                parts = {
                    name: tensors[prefix + name]
                    for name in FACTORS + FROZEN
                    if prefix + name in tensors
                }
                yield _Layer(prefix.rstrip(".") or "W", "factored", _Factored(parts))
            continue
        if tensor.dim() < 2:
            continue
        name = key.removesuffix(".weight")
        if key.endswith("in_proj_weight") and tensor.shape[0] == 3 * tensor.shape[1]:
            base = key.removesuffix("in_proj_weight").rstrip(".")
            for letter, weight in zip("qkv", tensor.chunk(3)):
                yield _Layer(f"{base}.{letter}_proj", f"in_proj.{letter}", _dense(weight))
        elif key.endswith(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            yield _Layer(key.removesuffix("_weight"), "projection", _dense(tensor))
        else:
            kind = "matrix" if tensor.dim() == 2 else f"kernel {tensor.dim() - 2}d"
            yield _Layer(name, kind, _dense(tensor))


@contextlib.contextmanager
def _read_only(model: nn.Module):
    """Eval mode and no_grad while reading weights; every module's training flag restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _operator_shape(operator: _Dense | _Factored) -> tuple[int, int]:
    if isinstance(operator, _Factored):
        parts = operator.parts  # checked: U_frozen and V_frozen, or U and V
        U, V = parts.get("U_frozen", parts.get("U")), parts.get("V_frozen", parts.get("V"))
        return U.shape[0], V.shape[0]
    groups, rows, cols = operator.blocks.shape
    return groups * rows, groups * cols


def _operator_tensors(operator: _Dense | _Factored) -> tuple[torch.Tensor, ...]:
    return tuple(operator.parts.values()) if isinstance(operator, _Factored) else (operator.blocks,)
