"""One growth step of successive refinement for a whole model, and the optimizer kept in step.

- `grow_model`: grow (or freeze, at full rank) every low-rank layer of a model at once, with
  `update_optimizer` keeping an existing optimizer in step (new tensors in, frozen ones out, all
  other state kept); all or nothing.
- `parameter_norms`: the norms of every parameter and frozen factor, the poster's signals.

`lowrank_ext.training.successive` builds its schedule on these and re-exports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import LowRankConv2d, LowRankLinear
from ..nn.factored import _FROZEN
from ..nn.transaction import all_or_nothing

# Layers that grow: both are FactoredModules, which hold the factor and growth code.
LOW_RANK_LAYERS = (LowRankLinear, LowRankConv2d)


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear | LowRankConv2d]:
    """The model's LowRankLinear and LowRankConv2d layers by qualified name, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, LOW_RANK_LAYERS)}


def _layers_or_raise(model: nn.Module) -> dict[str, LowRankLinear | LowRankConv2d]:
    layers = low_rank_layers(model)
    if not layers:
        raise ValueError("argument 'model' has no LowRankLinear or LowRankConv2d layer to grow")
    return layers


def model_rank(model: nn.Module) -> int:
    """The largest rank among the model's low-rank layers (those at full rank stop growing)."""
    return max(layer.rank for layer in _layers_or_raise(model).values())


def _limit(layer: LowRankLinear | LowRankConv2d) -> int:
    return min(layer.in_features, layer.out_features)


@dataclass
class Growth:
    """What one `grow_model` call did."""

    grown: dict[str, int]  # layer name -> its new rank
    frozen: list[str]  # layers at full rank whose active components were frozen, none added
    removed: list[str]  # parameter names whose old tensors left the optimizer
    added: list[str]  # parameter names whose new tensors joined the optimizer


def grow_model(
    model: nn.Module,
    k: int = 1,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    freeze_scales: bool = False,
    scale_init: float = 0.0,
    freeze_capped: bool = True,
    generator: torch.Generator | None = None,
) -> Growth:
    """Grow every low-rank layer of `model` by k components (`LowRankLinear.grow`).

    A layer with fewer than k ranks left before min(in, out) grows by what is left. A layer
    already at full rank adds nothing; with `freeze_capped` (default) its active components are
    frozen (`LowRankLinear.freeze`), so its u, v parameter groups drop out of training, as in the
    poster. If `optimizer` is given it is updated in place (`update_optimizer`).

    Raises ValueError if no layer can grow, RuntimeError naming the layer when one cannot grow
    (core="full", factors on the meta device or holding NaN/inf; checked before any changes).
    On any error, also one in the last step, the model and the optimizer are left exactly as
    they were (`lowrank_ext.nn.transaction`).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"argument 'k' must be a positive int, got {k!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"argument 'optimizer' must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    layers = _layers_or_raise(model)
    room = {name: _limit(layer) - layer.rank for name, layer in layers.items()}
    if not any(room.values()):
        raise ValueError(
            "argument 'model': every low-rank layer is at full rank min(in_features, "
            "out_features); nothing can grow"
        )
    acting = {
        name: layer
        for name, layer in layers.items()
        if room[name] or (freeze_capped and layer.active_rank)
    }
    for name, layer in acting.items():
        problem = layer._refine_problem()
        if problem is not None:
            raise RuntimeError(f"grow_model: layer {name!r}: {problem}; nothing was changed")
    before = dict(model.named_parameters())
    grown, frozen = {}, []
    with all_or_nothing(model, optimizer):
        for name, layer in acting.items():
            if room[name]:
                layer.grow(
                    min(k, room[name]),
                    freeze_scales=freeze_scales,
                    scale_init=scale_init,
                    generator=generator,
                )
                grown[name] = layer.rank
            else:
                layer.freeze(freeze_scales=freeze_scales)
                frozen.append(name)
        removed, added = [], []
        if optimizer is not None:
            removed, added = update_optimizer(optimizer, before, dict(model.named_parameters()))
    return Growth(grown, frozen, removed, added)


def update_optimizer(
    optimizer: torch.optim.Optimizer,
    before: Mapping[str, nn.Parameter],
    after: Mapping[str, nn.Parameter],
) -> tuple[list[str], list[str]]:
    """Make `optimizer` follow a change of a model's parameters, such as a growth.

    `before` and `after` are `dict(model.named_parameters())` taken around the change. A tensor
    of `before` no longer found under its name in `after` leaves its param group and its state is
    dropped. A tensor new in `after` takes the place of the tensor it replaces (same name) in
    that tensor's group or, if it replaces none, joins the group of another parameter of its
    module, placed after the parameter that precedes it in `after` (model order); it is not
    added if the optimizer held neither. Every other parameter keeps its place and its state
    (moments, step counts) untouched; new tensors start with fresh state. Works with optimizers
    that read `param_groups` at each step (all of torch.optim but LBFGS). Returns the names
    removed and added. On error the optimizer is unchanged.

    Keeping places keeps the usual resume working: an optimizer built over
    `model.parameters()` still lists them in model order after any number of growths, so
    "rebuild the model, load its state_dict, build a new optimizer over model.parameters(),
    load the optimizer's state_dict" pairs every moment with its own parameter. (torch's
    optimizer state_dict identifies parameters by position only.)
    """
    group_of = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    removed = [name for name, p in before.items() if after.get(name) is not p and p in group_of]
    gone = {before[name] for name in removed}
    joining = []
    for name, p in after.items():
        if before.get(name) is p or p in group_of or not p.requires_grad:
            continue
        group = _group_for(name, before, group_of)
        if group is not None:
            joining.append((name, p, group))
    params = [list(group["params"]) for group in optimizer.param_groups]
    order = list(after)
    for name, p, group in joining:
        params[group].insert(_place(name, p, params[group], before, after, order), p)
    params = [[p for p in group if p not in gone] for group in params]
    # Nothing above touched the optimizer; commit.
    for group, group_params in zip(optimizer.param_groups, params):
        group["params"] = group_params
    for p in gone:
        optimizer.state.pop(p, None)
    return removed, [name for name, _, _ in joining]


def _place(name, p, group: list, before, after, order: list[str]) -> int:
    """Where the new tensor `p` (named `name`) goes in `group` (old tensors still in it): at its
    predecessor's place, else just after the nearest parameter before it in model order."""
    predecessor = before.get(name)
    for i, q in enumerate(group):
        if q is predecessor:
            return i
    for earlier in reversed(order[: order.index(name)]):
        for i, q in enumerate(group):
            if q is after[earlier] or q is before.get(earlier):
                return i + 1
    return 0


def _group_for(name: str, before: Mapping[str, nn.Parameter], group_of: dict) -> int | None:
    predecessor = before.get(name)
    if predecessor is not None:
        return group_of.get(predecessor)
    module = name.rpartition(".")[0]
    for other, p in before.items():
        if other.rpartition(".")[0] == module and p in group_of:
            return group_of[p]
    return None


def parameter_norms(model: nn.Module) -> dict[str, float]:
    """‖·‖_F of every parameter and of every low-rank layer's frozen U, V and scales, by name.

    For a grown layer, U and V are the raw active factors (their columns are used normalized,
    so their norms tell how far the optimizer has pushed them, not the weight's size).
    """
    tensors = dict(model.named_parameters())
    for name, layer in low_rank_layers(model).items():
        for attr in _FROZEN:
            if getattr(layer, attr) is not None:
                tensors[f"{name}.{attr}" if name else attr] = getattr(layer, attr)
    return _norms(tensors)


def _norms(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    if not tensors:
        return {}
    values = torch.stack([torch.linalg.vector_norm(t.detach()).double() for t in tensors.values()])
    return dict(zip(tensors, values.tolist()))
