"""Functional API: the custom ops, their fake (meta) implementations and their autograd.

`linear` is `torch.ops.lowrank_ext.linear`, a composite of `linear_forward` (fused kernel,
returns y and the saved t = x V) whose backward is the fused `linear_backward` op.
`project_out` is likewise a composite of `project_out_forward` (returns Y and the float64
Gram–Schmidt coefficients and norms the fused `project_out_backward` needs).
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
    """Y = X − Q(QᵀX), applied `passes` times; with `normalize`, columns scaled to unit norm.

    Args:
        Q: (n, k) with orthonormal columns (k may be 0). Orthonormality is assumed, not checked
            (that would cost O(n k²)).
        X: (n, p), same dtype and device as Q.
        passes: Gram–Schmidt passes; 1 is classical Gram–Schmidt, the default 2 (CGS2) leaves Y
            orthogonal to span(Q) to working precision even when X is close to span(Q).
        normalize: scale each column of Y to unit norm. A column that is zero or lies in span(Q)
            to working precision (‖y‖ ≤ 4·eps·‖x‖, eps of the dtype) raises a RuntimeError naming
            it, as does one whose norm is not finite; without normalize NaN/Inf propagate.

    float32 and float64 only, on CPU and CUDA: every sum is accumulated in float64 and no
    TF32/half-precision matmul is used, whatever torch's precision settings. Under autocast,
    half inputs are computed in float32. Differentiable in Q and X (fused backward).
    """
    return _ops.project_out(Q, X, passes, normalize)


def _check_project_out_fake_args(Q, X, passes):
    op = "lowrank_ext.project_out"
    torch._check(X.dim() == 2, lambda: f"{op}: argument 'X' must be 2-D (n, p), got {X.dim()}-D")
    torch._check(Q.dim() == 2, lambda: f"{op}: argument 'Q' must be 2-D (n, k), got {Q.dim()}-D")
    torch._check(
        X.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: argument 'X' has dtype {X.dtype}; float32 or float64 only",
    )
    torch._check(
        Q.dtype == X.dtype, lambda: f"{op}: argument 'Q' has dtype {Q.dtype} but X has {X.dtype}"
    )
    torch._check(
        Q.device == X.device, lambda: f"{op}: argument 'Q' is on {Q.device} but X is on {X.device}"
    )
    torch._check(
        Q.shape[0] == X.shape[0],
        lambda: f"{op}: argument 'Q' must be ({X.shape[0]}, k), got {tuple(Q.shape)}",
    )
    torch._check(passes >= 1, lambda: f"{op}: argument 'passes' must be >= 1, got {passes}")


@torch.library.register_fake("lowrank_ext::project_out_forward")
def _project_out_forward_fake(Q, X, passes, normalize):
    _check_project_out_fake_args(Q, X, passes)
    n, p = X.shape
    coeffs = X.new_empty((passes, Q.shape[1], p), dtype=torch.float64)
    norms = X.new_empty((p,) if normalize else (0,), dtype=torch.float64)
    return X.new_empty((n, p)), coeffs, norms


@torch.library.register_fake("lowrank_ext::project_out_backward")
def _project_out_backward_fake(grad_Y, Q, X, Y, coeffs, norms, passes, normalize, output_mask):
    grad_Q = Q.new_empty(Q.shape) if output_mask[0] else Q.new_empty((0,))
    grad_X = X.new_empty(X.shape) if output_mask[1] else X.new_empty((0,))
    return grad_Q, grad_X


def _project_out_setup_context(ctx, inputs, output):
    Q, X, passes, normalize = inputs
    Y, coeffs, norms = output
    ctx.passes, ctx.normalize = passes, normalize
    ctx.mark_non_differentiable(coeffs, norms)
    ctx.save_for_backward(Q, X, Y, coeffs, norms)


def _project_out_backward(ctx, grad_Y, _grad_coeffs, _grad_norms):
    Q, X, Y, coeffs, norms = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    if torch.is_grad_enabled():
        # create_graph=True (double backward): differentiate the plain-PyTorch formula.
        wanted = [t for t, m in zip((Q, X), mask) if m]
        with torch.enable_grad():
            out = reference.project_out(Q, X, ctx.passes, ctx.normalize)
            grads = iter(torch.autograd.grad(out, wanted, grad_Y, create_graph=True))
        return tuple(next(grads) if m else None for m in mask) + (None, None)
    grads = _ops.project_out_backward(
        grad_Y, Q, X, Y, coeffs, norms, ctx.passes, ctx.normalize, mask
    )
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None)


torch.library.register_autograd(
    "lowrank_ext::project_out_forward",
    _project_out_backward,
    setup_context=_project_out_setup_context,
)
