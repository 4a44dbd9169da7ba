"""All or nothing: what a failed state change puts back.

Every call that changes a model in several steps (grow/freeze, set_weight, convert, merge,
grow_model, OIALR's conversion, rank update and load_state_dict) runs its changes inside
`all_or_nothing`, so an error at any step, the last included, leaves the modules, the optimizer
and the objects named exactly as they were: the same Parameter and buffer objects in the same
places, the same submodules, attributes, gradients and requires_grad flags, the optimizer's
param_groups in the same order with the same settings, and its state entries.

Tensor values are put back only for the modules named in `values`: the calls that write into
existing tensors in place (set_weight at the same rank, OIALR's update at the same rank) name
theirs; the others only swap objects, which a snapshot of the references restores. The
optimizer's state tensors are restored by reference (no call here writes into them in place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _shallow(value):
    return type(value)(value) if type(value) in (list, dict) else value


class Snapshot:
    """The state of `model`'s modules (every submodule), of `optimizer` and of `objects`,
    taken now; `restore()` puts it back.

    Args:
        model: a module; each of its submodules is recorded (registries, attributes, gradients
            and requires_grad flags of its parameters).
        optimizer: a torch.optim.Optimizer, or None.
        values: modules whose parameter and buffer values are copied too (for calls that write
            in place).
        objects: other objects whose attributes are recorded (one level deep: a list or dict
            attribute is copied, its items are not).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        values: Iterable[nn.Module] = (),
        objects: Iterable[object] = (),
    ) -> None:
        self._modules = []
        for module in model.modules():
            attributes = {
                key: dict(value) if key in _REGISTRIES else value
                for key, value in module.__dict__.items()
            }
            self._modules.append((module, attributes))
        self._parameters = [
            (p, p.grad, p.requires_grad)
            for p in {id(p): p for p in _all_parameters(model)}.values()
        ]
        self._values = []
        with torch.no_grad():
            for module in values:
                for tensor in (*module.parameters(), *module.buffers()):
                    self._values.append((tensor, tensor.detach().clone()))
        self._optimizer = optimizer
        if optimizer is not None:
            self._groups = [
                (group, dict(group), list(group["params"])) for group in optimizer.param_groups
            ]
            self._group_list = list(optimizer.param_groups)
            self._state = {p: (state, dict(state)) for p, state in optimizer.state.items()}
        self._objects = [
            (obj, {key: _shallow(value) for key, value in vars(obj).items()}) for obj in objects
        ]

    def restore(self) -> None:
        """Put everything recorded back (objects, then values)."""
        for module, attributes in self._modules:
            current = module.__dict__
            for key in [key for key in current if key not in attributes]:
                del current[key]
            for key, value in attributes.items():
                if key in _REGISTRIES:
                    registry = current.get(key)
                    if not isinstance(registry, dict):
                        registry = type(value)()
                    registry.clear()
                    registry.update(value)
                    value = registry
                current[key] = value
        for p, grad, requires_grad in self._parameters:
            p.requires_grad_(requires_grad)
            p.grad = grad
        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)
        if self._optimizer is not None:
            for group, settings, params in self._groups:
                group.clear()
                group.update(settings)
                group["params"] = params
            self._optimizer.param_groups[:] = self._group_list
            self._optimizer.state.clear()
            for p, (state, entries) in self._state.items():
                state.clear()
                state.update(entries)
                self._optimizer.state[p] = state
        for obj, attributes in self._objects:
            vars(obj).clear()
            vars(obj).update(attributes)


def _all_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for module in model.modules():
        yield from (p for p in module._parameters.values() if p is not None)


@contextlib.contextmanager
def all_or_nothing(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    values: Iterable[nn.Module] = (),
    objects: Iterable[object] = (),
) -> Iterator[Snapshot]:
    """Run the block; if it raises (any exception, KeyboardInterrupt included), restore the
    `Snapshot(model, optimizer, values=values, objects=objects)` taken on entry and re-raise."""
    snapshot = Snapshot(model, optimizer, values=values, objects=objects)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
