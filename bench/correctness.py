"""Check every implementation against a float64 reference before it is timed, so a broken
kernel (or a baseline set up wrongly) can never post a fast number."""

from __future__ import annotations

import torch
from cases import Problem

from lowrank_ext import reference

# Norm-wise relative error allowed: the inputs are rounded to the dtype, the sums run over
# in_features (or the batch, for dU/dS/dV) in at least fp32.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class Reference:
    """y and all gradients in float64 for input copy 0, computed once per problem."""

    def __init__(self, problem: Problem):
        x = problem.xs[0].detach().double().requires_grad_()
        params = [p.detach().double().requires_grad_() for p in problem.params]
        y = reference.linear(x, *params)
        grads = torch.autograd.grad(y, (x, *params), problem.dys[0].double())
        self.y = y.detach()
        self.grads = dict(zip(("x", "U", "S", "V", "bias"), grads, strict=True))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(impl: str, pass_: str, problem: Problem, ref: Reference, out) -> None:
    """Raise AssertionError naming the tensor and the error if `out` = step(0) is wrong."""
    y, grads = out
    tol = TOLERANCE[problem.xs[0].dtype]
    named = [("y", y, ref.y)]
    if pass_ == "fwd+bwd":
        assert "x" in grads, f"{impl} {pass_}: no gradient for x"
        # Only gradients with a low-rank counterpart are compared: dense's weight and
        # two_linear's A have none. two_linear's dU = dyᵀ (x Aᵀ) = dyᵀ (x V Sᵀ) is the reference's.
        named += [(n, g, ref.grads[n]) for n, g in grads.items() if n in ref.grads]
    for name, got, want in named:
        assert got.shape == want.shape, f"{impl} {pass_}: {name} has shape {tuple(got.shape)}"
        err = rel_error(got, want)
        assert err <= tol, (
            f"{impl} {pass_} {problem.shape.label()}: {name} differs from the float64 "
            f"reference by {err:.2e} (relative norm), more than {tol:.0e}"
        )
