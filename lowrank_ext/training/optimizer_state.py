"""Keeping a torch.optim optimizer in step with a change of parametrization (used by OIALR).

A parameter S expressed in new coordinates S' = Aᵀ S B (A, B with orthonormal columns) has
gradient Aᵀ G B. A state that is linear in the gradient (momentum, Adam's first moment, ...)
transforms the same way, exactly. A state of elementwise squares (Adam's second moment, ...)
has no exact image; its image is the diagonal of the transformed covariance when the entries
are independent: v' = (A∘A)ᵀ v (B∘B), exact when A and B are signed permutations.
"""

from __future__ import annotations

import torch

# Optimizer state entries that transform like the parameter (linear in the gradient) ...
LINEAR_STATES = frozenset({"momentum_buffer", "exp_avg", "grad_avg", "ax", "prev"})
# ... and those that accumulate squares of the gradient elementwise.
SQUARED_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


def per_element(value, param: torch.Tensor) -> bool:
    """Whether a state entry holds one number per element of `param` (not e.g. a step count)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape


def check_transformable(optimizer: torch.optim.Optimizer, params) -> None:
    """Refuse, before anything changes, a per-element state whose transform is unknown."""
    known = LINEAR_STATES | SQUARED_STATES
    for param in params:
        for key, value in optimizer.state.get(param, {}).items():
            if per_element(value, param) and key not in known:
                raise ValueError(
                    f"OIALR(state_mode='rotate') cannot carry {type(optimizer).__name__}'s state "
                    f"{key!r} into a new basis (known: {sorted(known)}); use "
                    "state_mode='slice' or 'reset'"
                )


def change_basis(key: str, value: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The state entry `key` in the coordinates Aᵀ · B (a conv kernel's as (out, in·kh·kw))."""
    matrix = value.reshape(value.shape[0], -1)
    if key in LINEAR_STATES:
        return sandwich(A, matrix, B)
    return sandwich(A * A, matrix, B * B)


def replace(optimizer: torch.optim.Optimizer, old, new: list) -> dict | None:
    """Put the parameters `new` where `old` was in its param group; old's state, popped (None
    when the optimizer does not hold `old`)."""
    for group in optimizer.param_groups:
        position = next((i for i, p in enumerate(group["params"]) if p is old), None)
        if position is not None:
            group["params"][position : position + 1] = new
            return optimizer.state.pop(old, None) or {}
    return None


def drop(optimizer: torch.optim.Optimizer, params) -> None:
    """Remove `params` (and their state) from the optimizer."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for param in params:
        optimizer.state.pop(param, None)


def sandwich(left: torch.Tensor, middle: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ · middle · right in float64, returned in middle's dtype."""
    product = left.detach().double().mT @ middle.double() @ right.detach().double()
    return product.to(middle.dtype)
