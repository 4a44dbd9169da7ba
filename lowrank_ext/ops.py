"""Functional API: the custom ops, their fake (meta) implementations and their autograd.

`linear` is `torch.ops.lowrank_ext.linear`, a composite of `linear_forward` (fused kernel,
returns y and the saved t = x V) whose backward is the fused `linear_backward` op.
"""

from __future__ import annotations

import torch

from . import reference
from ._extension import load

BUILD_CONFIG = load()
_ops = torch.ops.lowrank_ext


def linear(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x V) Sᵀ) Uᵀ + bias without forming W = U S Vᵀ.

    Args:
        x: (..., in_features), any number of leading dims (a batch of 0 is fine).
        U: (out_features, r).
        S: (r,) for a diagonal core or (r, r) for a full core.
        V: (in_features, r).
        bias: (out_features,) or None.

    All tensors share one dtype (CPU: float32/float64; CUDA: also float16/bfloat16, accumulated
    in float32) and one device. Under autocast, CUDA inputs are cast to the autocast dtype and
    CPU inputs to float32. Returns y of shape (..., out_features).
    """
    return _ops.linear(x, U, S, V, bias)


def _check_fake_args(x, U, S, V, bias):
    # Shape checks at trace time (the kernels repeat them with the full message at run time).
    torch._check(x.dim() >= 1, lambda: "lowrank_ext.linear: argument 'x' must have at least 1 dim")
    torch._check(
        U.dim() == 2, lambda: f"lowrank_ext.linear: argument 'U' must be 2-D, got {U.dim()}-D"
    )
    torch._check(
        V.dim() == 2, lambda: f"lowrank_ext.linear: argument 'V' must be 2-D, got {V.dim()}-D"
    )
    r = U.shape[1]
    torch._check(V.shape[1] == r, lambda: "lowrank_ext.linear: 'U' and 'V' must share the rank")
    torch._check(
        V.shape[0] == x.shape[-1],
        lambda: (
            f"lowrank_ext.linear: argument 'V' must be ({x.shape[-1]}, rank), got {tuple(V.shape)}"
        ),
    )
    torch._check(
        S.shape in ((r,), (r, r)),
        lambda: (
            f"lowrank_ext.linear: argument 'S' must be ({r},) or ({r}, {r}), got {tuple(S.shape)}"
        ),
    )
    torch._check(
        bias is None or bias.shape == (U.shape[0],),
        lambda: f"lowrank_ext.linear: argument 'bias' must be ({U.shape[0]},)",
    )
    for name, other in (("U", U), ("S", S), ("V", V), ("bias", bias)):
        if other is None:
            continue
        torch._check(
            other.dtype == x.dtype,
            lambda name=name, other=other: (
                f"lowrank_ext.linear: argument '{name}' has dtype "
                f"{other.dtype} but x has dtype {x.dtype}"
            ),
        )
        torch._check(
            other.device == x.device,
            lambda name=name, other=other: (
                f"lowrank_ext.linear: argument '{name}' is on {other.device} but x is on {x.device}"
            ),
        )


@torch.library.register_fake("lowrank_ext::linear_forward")
def _linear_forward_fake(x, U, S, V, bias, save_t):
    _check_fake_args(x, U, S, V, bias)
    y = x.new_empty((*x.shape[:-1], U.shape[0]))
    batch = 1
    for size in x.shape[:-1]:
        batch = batch * size
    t = x.new_empty((batch, U.shape[1])) if save_t else x.new_empty((0,))
    return y, t


@torch.library.register_fake("lowrank_ext::linear_backward")
def _linear_backward_fake(grad_y, x, t, U, S, V, output_mask):
    def grad_like(needed, like):
        return like.new_empty(like.shape) if needed else like.new_empty((0,))

    return (
        grad_like(output_mask[0], x),
        grad_like(output_mask[1], U),
        grad_like(output_mask[2], S),
        grad_like(output_mask[3], V),
        U.new_empty((U.shape[0],)) if output_mask[4] else U.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, U, S, V, bias, _save_t = inputs
    _y, t = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(t)
    ctx.save_for_backward(x, U, S, V, t)


def _backward(ctx, grad_y, _grad_t):
    x, U, S, V, t = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2], needs[3], ctx.has_bias and needs[4]]
    if torch.is_grad_enabled():
        # create_graph=True (double backward): the fused backward has no derivative of its
        # own, so differentiate the plain-PyTorch formula instead.
        return _differentiable_backward(grad_y, x, U, S, V, mask) + (None,)
    grads = _ops.linear_backward(grad_y, x, t, U, S, V, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)


def _differentiable_backward(grad_y, x, U, S, V, mask):
    # Rebuild the forward from the saved inputs (still attached to the graph) with plain ops.
    inputs = (x, U, S, V)
    wanted = [i for i, m in zip(inputs, mask[:4]) if m]
    with torch.enable_grad():
        y = reference.linear(x, U, S, V)
        grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
    out = [next(grads) if m else None for m in mask[:4]]
    bias_grad = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if mask[4] else None
    return (*out, bias_grad)


torch.library.register_autograd(
    "lowrank_ext::linear_forward", _backward, setup_context=_setup_context
)


def project_out(
    Q: torch.Tensor, X: torch.Tensor, passes: int = 2, normalize: bool = False
) -> torch.Tensor:
    """Y = X − Q(QᵀX) applied `passes` times; columns scaled to unit norm if `normalize`.

    TEMPORARY: plain-PyTorch until the fused kernel lands (same contract).
    """
    return reference.project_out(Q, X, passes, normalize)
