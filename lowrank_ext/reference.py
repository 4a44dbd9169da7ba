"""Plain-PyTorch versions of the ops: the test oracle and the "eager unfused" baseline.

They use only public torch functions, so autograd differentiates them and torch.compile can
fuse them; `lowrank_ext.ops` must agree with them to floating-point tolerance.
"""

from __future__ import annotations

import torch


def linear(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x V) Sᵀ) Uᵀ + bias, evaluated as eager PyTorch does it (one kernel per step).

    S is a vector (the diagonal of the core) or an (r, r) core.
    """
    t = x @ V
    t = t * S if S.dim() == 1 else t @ S.T
    y = t @ U.T
    return y if bias is None else y + bias


def linear_chained(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same formula as three `F.linear` calls, the bias fused into the last one."""
    t = torch.nn.functional.linear(x, V.T)
    t = t * S if S.dim() == 1 else torch.nn.functional.linear(t, S)
    return torch.nn.functional.linear(t, U, bias)


def dense_weight(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """W = U S Vᵀ as a dense (out, in) matrix — for checks and tools, never for the forward."""
    return (U * S) @ V.T if S.dim() == 1 else U @ S @ V.T


def project_out(
    Q: torch.Tensor, X: torch.Tensor, passes: int = 2, normalize: bool = False
) -> torch.Tensor:
    """Y = X − Q(QᵀX), applied `passes` times (classical Gram–Schmidt), columns optionally
    scaled to unit norm. Q: (n, k) with orthonormal columns, X: (n, p)."""
    Y = X
    for _ in range(passes):
        Y = Y - Q @ (Q.T @ Y)
    return Y / torch.linalg.vector_norm(Y, dim=0) if normalize else Y
