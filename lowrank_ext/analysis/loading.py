"""Reading the weight matrices out of a module, a state_dict or a tensor, for
`lowrank_ext.analysis.spectral.analyze` (which matrices, and how each is read: see its module
docstring).

Each matrix becomes a `_Layer`: a name, a kind and an operator, either `_Dense` (one matrix, or
the blocks of a grouped convolution) or `_Factored` (U, S, V of W = U S Vᵀ, never multiplied
out).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.hf_conv1d import conv1d_class


class _Dense(NamedTuple):
    blocks: torch.Tensor  # (g, rows, cols): the block-diagonal operator diag(blocks[0], …)


class _Factored(NamedTuple):
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class _Layer(NamedTuple):
    name: str
    kind: str
    operator: _Dense | _Factored


def _dense(matrix: torch.Tensor, groups: int = 1) -> _Dense:
    return _Dense(matrix.reshape(groups, matrix.shape[0] // groups, math.prod(matrix.shape[1:])))


def _factors_of(module: nn.Module) -> _Factored | None:
    U, S, V = (getattr(module, name, None) for name in ("U", "S", "V"))
    if not all(torch.is_tensor(t) for t in (U, S, V)):
        return None
    if U.dim() != 2 or V.dim() != 2 or S.dim() not in (1, 2):
        return None
    return _Factored(U, S, V)


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
    # Rows in the state_dict's order; a factored layer where the first of its U, S, V is.
    factored = {}
    for key in tensors:
        if key == "U" or key.endswith(".U"):
            prefix = key[:-1]
            if all(prefix + letter in tensors for letter in "USV"):
                factored.update((prefix + letter, prefix) for letter in "USV")
    emitted = set()
    for key, tensor in tensors.items():
        prefix = factored.get(key)
        if prefix is not None:
            if prefix not in emitted:
                emitted.add(prefix)
                triple = [tensors[prefix + letter] for letter in "USV"]
                yield _Layer(prefix.rstrip(".") or "W", "factored", _Factored(*triple))
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
        return operator.U.shape[0], operator.V.shape[0]
    groups, rows, cols = operator.blocks.shape
    return groups * rows, groups * cols


def _operator_tensors(operator: _Dense | _Factored) -> tuple[torch.Tensor, ...]:
    return tuple(operator) if isinstance(operator, _Factored) else (operator.blocks,)
