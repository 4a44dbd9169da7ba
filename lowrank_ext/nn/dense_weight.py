"""The dense face of a factored module: `.weight`, a read-only view of U S Vᵀ, and `set_weight`.

`.weight` is built from the factors on every read, so a write to it could only change a
temporary copy and be lost. It is returned as a `DenseView`, a torch.Tensor subclass that
refuses every write (in-place methods, `.data` writes, `out=` and `inplace=True` targets,
nn.init) with an error saying how to set the weight instead; every other operation returns
plain tensors, so the view does not spread into the results of the code that reads it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import reference
from .transaction import all_or_nothing
from .truncation import _check_allow_larger, _check_rank, _truncated_svd, check_matrix, factorize

__all__ = ["DenseView", "DenseWeight"]

_HOW_TO_SET = (
    "the .weight of a low-rank module is a dense view of U S Vᵀ, rebuilt on every read, so a "
    "write to it would change nothing. Set the weight with module.set_weight(W) (W refactorized "
    "by SVD; rank= or energy= to change the rank), or write the factors module.U, module.S, "
    "module.V (e.g. nn.init.orthogonal_(module.U))"
)
# In-place by name, but harmless to the module: autograd flags and storage placement only.
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "detach_"})
_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__"
    for op in ("add sub mul matmul truediv floordiv div mod pow and or xor lshift rshift".split())
) | {"__setitem__"}
# Views of the view stay read-only (a write through weight[0] or weight.T must fail too).
_VIEWS = frozenset(
    {
        "data.__get__",
        "T.__get__",
        "mT.__get__",
        "H.__get__",
        "mH.__get__",
        "__getitem__",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "t",
        "transpose",
        "swapaxes",
        "swapdims",
        "permute",
        "movedim",
        "moveaxis",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "narrow",
        "select",
        "expand",
        "expand_as",
        "as_strided",
        "diagonal",
        "unbind",
        "split",
        "chunk",
        "tensor_split",
        "unfold",
    }
)


def _name(func) -> str:
    """func's name; "data.__get__"-style for a property's getter or setter."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__delete__"):
        return f"{getattr(getattr(func, '__self__', None), '__name__', '')}.{name}"
    return name


def _holds_view(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(item, DenseView) for item in value)
    return isinstance(value, DenseView)


def _write(func, args, kwargs) -> str | None:
    """What `func(*args, **kwargs)` would write into a DenseView, or None."""
    name = _name(func)
    target = args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))
    if name == "data.__set__" and _holds_view(target):
        return "setting .weight.data"
    in_place = name in _IN_PLACE_OPERATORS or (
        name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES
    )
    if (in_place or kwargs.get("inplace") is True) and _holds_view(target):
        return f"{name or repr(func)}{'' if in_place else ' with inplace=True'} on .weight"
    if _holds_view(kwargs.get("out")):
        return f"{name or repr(func)} with out=.weight"
    return None


def _as_views(result):
    if isinstance(result, torch.Tensor):
        return result.as_subclass(DenseView)
    if isinstance(result, (list, tuple)):
        return type(result)(_as_views(item) for item in result)
    return result


class DenseView(torch.Tensor):
    """A read-only dense weight computed from factors (what FactoredModule.weight returns).

    Reading works as on any tensor, with autograd: gradients of a function of the view reach
    U, S and V. Writes raise RuntimeError saying how to set the weight: in-place methods
    (names ending in "_": add_, copy_, zero_, fill_, uniform_, ...; `requires_grad_` and
    `retain_grad` stay allowed), in-place operators (+=, weight[i] = ...), `.data` writes and
    in-place ops on `.data`, `out=` and `inplace=True` targets, hence every nn.init function.
    Views (.data, .T, indexing, view, reshape, transpose, ...) stay DenseViews; every other
    result, `.detach()`, `.clone()` and copy.deepcopy included, is a plain torch.Tensor, and
    pickling (torch.save) stores a plain tensor.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        write = _write(func, args, kwargs)
        if write is not None:
            raise RuntimeError(f"{write}: {_HOW_TO_SET}")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)  # plain tensors out: nothing converts them back
        if _name(func) in _VIEWS and args and isinstance(args[0], DenseView):
            return _as_views(result)  # a view of the view (not of another argument)
        return result

    def set_(self, *args, **kwargs):
        # Tensor.set_ does not dispatch __torch_function__.
        raise RuntimeError(f"set_ on .weight: {_HOW_TO_SET}")

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.as_subclass(torch.Tensor), memo)

    def __reduce_ex__(self, protocol):
        # A plain tensor on disk: loading it needs neither lowrank_ext nor weights_only rules.
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class DenseWeight(nn.Module):
    """The base of FactoredModule that gives it a dense face: `.weight` and `set_weight`.

    A subclass provides `factors()`, `_weight_shape()`, `_core_shape(rank)`, `_copy_svd`, and
    the attributes in_features, out_features, core, rank, frozen_rank and U, S, V.
    """

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight W = U S Vᵀ in the dense module's shape ((out, in) for LowRankLinear,
        (out, in, kh, kw) for LowRankConv2d), in the factors' dtype and device, built on each
        read; forward never uses it. Differentiable (gradients reach U, S, V). Read-only: a
        `DenseView`, whose writes raise RuntimeError; assigning `.weight` raises
        AttributeError. Use `set_weight` to set it."""
        dense = reference.dense_weight(*self.factors()).reshape(self._weight_shape())
        if torch.compiler.is_compiling():
            return dense  # dynamo cannot trace the subclass; compiled code reads a plain tensor
        return dense.as_subclass(DenseView)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(f"{type(self).__name__}.weight cannot be assigned: {_HOW_TO_SET}")
        super().__setattr__(name, value)

    def set_weight(
        self,
        weight: torch.Tensor,
        rank: int | None = None,
        energy: float | None = None,
        *,
        allow_larger: bool = False,
    ) -> None:
        """Set W to the best approximation of `weight` at a rank: the leading singular triplets
        of its SVD (computed in float64, as from_linear does). The bias is kept.

        Args:
            weight: the dense weight in `.weight`'s shape ((out, in) for LowRankLinear,
                (out, in, kh, kw) for LowRankConv2d); real floating point of any precision,
                finite, on any device (copied into the factors' dtype and device). Not
                differentiated through.
            rank: the new rank, in [1, min(in_features, out_features)].
            energy: instead of rank, the smallest rank holding this fraction of Σσ².
            allow_larger: allow a `rank`/`energy` choice above the break-even rank, where the
                factors hold more numbers than the dense weight (see
                `lowrank_ext.nn.break_even_rank`). Neither rank nor energy keeps the module's
                rank, which is never refused.

        At the module's rank U, S and V are written in place (the Parameters stay, but the
        optimizer's moments refer to the old factors); at another rank they become new
        Parameters (requires_grad kept): re-create optimizers, which hold the old ones.

        Raises TypeError (weight not a floating-point tensor, allow_larger not a bool),
        ValueError (wrong shape, NaN/inf, on the meta device or not dense, rank or energy out
        of range or both given, a rank above the break-even rank without allow_larger:
        `LargerThanDenseError`), RuntimeError (a layer with frozen components from
        grow/freeze). A zero weight has energy rank 1. On any error, also one while the factors
        are written, the module is unchanged (`lowrank_ext.nn.transaction`).
        """
        kind = type(self).__name__
        _check_allow_larger(allow_larger)
        weight = check_matrix(weight, "argument 'weight'").detach()
        shape = tuple(self._weight_shape())
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"argument 'weight' must have the shape of {kind}.weight, {shape}, got "
                f"{tuple(weight.shape)}"
            )
        if self.frozen_rank:
            raise RuntimeError(
                f"set_weight: this {kind} has {self.frozen_rank} frozen components "
                "(grow/freeze); build a new layer with from_linear/from_conv2d instead"
            )
        matrix = weight.reshape(self.out_features, self.in_features)
        if rank is None and energy is None:
            rank, U, sigma, V = _truncated_svd(matrix, self.rank, None)
        else:
            rank, U, sigma, V = factorize(matrix, rank, energy, self.core, allow_larger)
            rank = _check_rank(rank, self.in_features, self.out_features)
        # U, V, S are written one after the other (in place at the same rank): all or nothing.
        with all_or_nothing(self, values=[self]):
            if rank != self.rank:
                shapes = {
                    "U": (self.out_features, rank),
                    "S": self._core_shape(rank),
                    "V": (self.in_features, rank),
                }
                for name, shape in shapes.items():
                    old = getattr(self, name)
                    setattr(self, name, nn.Parameter(old.new_empty(shape), old.requires_grad))
            self._copy_svd(U, sigma, V, None)
