"""The rebuild-W baseline: OIALR's layer state trained the way the paper's reference code does.

OIALR (Coquelin et al., arXiv:2401.08505) trains W = U S Vᵀ with U and V frozen and the r×r core
S (and the bias) trainable, but its reference implementation builds the dense W = U S Vᵀ in every
forward and runs the dense layer on it, so a training step costs a dense step plus the rebuild.
These modules reproduce that style over the same factors as a `lowrank_ext` layer, so a benchmark
can compare the two on the same function:

- `RebuildWLinear` / `RebuildWConv2d`: U, V frozen buffers, S and bias parameters; forward is
  F.linear / F.conv2d on U @ S @ Vᵀ, rebuilt every call, autograd through the product.
- `rebuild_w_copy(model)`: a deep copy with every LowRankLinear / LowRankConv2d swapped for one.

Unsupported (clear errors): grown layers (frozen_rank > 0: their factors are projected, not
plain), conv padding modes other than "zeros". A LowRankMultiheadAttention keeps working: its
self-attention path calls `in_proj(query)` (so W is rebuilt), its cross-attention path reads
`in_proj.factors()` and runs the fused op on them, i.e. that one path is NOT rebuild-W style.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ext import LowRankConv2d, LowRankLinear, reference

__all__ = ["RebuildWConv2d", "RebuildWLinear", "rebuild_w_copy"]


def _check_plain(module, kind) -> None:
    if not isinstance(module, kind):
        raise TypeError(f"argument 'module' must be a {kind.__name__}, got {type(module).__name__}")
    if module.frozen_rank:
        raise ValueError(
            f"argument 'module' has frozen_rank={module.frozen_rank}: grown layers use projected "
            "factors, which the rebuild-W baseline does not model"
        )


class _RebuildW(nn.Module):
    """Shared state: U (out, r) and V (in, r) as frozen buffers, S and bias as parameters."""

    def __init__(self, U, S, V, bias) -> None:
        super().__init__()
        # Buffers, not parameters: OIALR never trains U and V, and the optimizer must not see them.
        self.register_buffer("U", U.detach().clone())
        self.register_buffer("V", V.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.core = "full" if S.dim() == 2 else "diag"
        self.in_features, self.out_features = V.shape[0], U.shape[0]

    @classmethod
    def _from(cls, module, **extra):
        new = cls(module.U, module.S, module.V, module.bias, **extra)
        new.S.requires_grad_(module.S.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        return new.train(module.training)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, V), for callers that read a layer's factors (cross-attention does)."""
        return self.U, self.S, self.V

    def dense_weight(self) -> torch.Tensor:
        """W = U S Vᵀ (out, in), rebuilt on every call: the reference-style cost under test."""
        return reference.dense_weight(self.U, self.S, self.V)


class RebuildWLinear(_RebuildW):
    """y = x Wᵀ + b with W = U S Vᵀ rebuilt every forward (the OIALR reference style)."""

    @classmethod
    def from_low_rank(cls, module: LowRankLinear) -> RebuildWLinear:
        """The same function as a never-grown LowRankLinear, on copies of its factors."""
        _check_plain(module, LowRankLinear)
        return cls._from(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, core={self.core!r}"


class RebuildWConv2d(_RebuildW):
    """Conv2d whose (out, in, kh, kw) kernel is U S Vᵀ reshaped, rebuilt every forward."""

    def __init__(self, U, S, V, bias, *, in_channels, kernel_size, stride, padding, dilation):
        super().__init__(U, S, V, bias)
        self.in_channels, self.out_channels = in_channels, U.shape[0]
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = padding, tuple(dilation)

    @classmethod
    def from_low_rank(cls, module: LowRankConv2d) -> RebuildWConv2d:
        """The same function as a never-grown LowRankConv2d with zeros padding."""
        _check_plain(module, LowRankConv2d)
        if module.padding_mode != "zeros":
            raise ValueError(
                f"argument 'module' has padding_mode={module.padding_mode!r}; the rebuild-W "
                "baseline supports only 'zeros'"
            )
        return cls._from(
            module,
            in_channels=module.in_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        return F.conv2d(input, kernel, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rank={self.rank}, core={self.core!r}"
        )


def _counterpart(module: nn.Module) -> nn.Module | None:
    if isinstance(module, LowRankLinear):
        return RebuildWLinear.from_low_rank(module)
    if isinstance(module, LowRankConv2d):
        return RebuildWConv2d.from_low_rank(module)
    return None


def rebuild_w_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every LowRankLinear / LowRankConv2d replaced by its rebuild-W
    counterpart (same factors, so the same function); `model` itself is left untouched."""
    model = copy.deepcopy(model)
    top = _counterpart(model)
    if top is not None:
        return top
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = _counterpart(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model
