"""LowRankConv2d: a Conv2d whose kernel, reshaped to (out, in·kh·kw), lives only as U S Vᵀ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .factored import FactoredModule, _check_features
from .truncation import check_matrix, factorize

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    values = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(values, (tuple, list))
        or len(values) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values)
    ):
        raise ValueError(
            f"argument '{name}' must be an int >= {minimum} or a pair of them, got {value!r}"
        )
    return tuple(values)


class LowRankConv2d(FactoredModule):
    """nn.Conv2d (groups=1) whose kernel K, reshaped to W (out, in·kh·kw), is W = U S Vᵀ of rank r.

    Run without rebuilding K: a kh×kw convolution of the input to r channels with the kernel
    Vᵀ reshaped to (r, in, kh, kw) (it carries stride, padding and dilation), then a 1×1
    convolution with U S as an (out, r, 1, 1) kernel, plus the bias. Both are `F.conv2d`: the
    fused kernels of this project are for the linear case. Cost per output pixel:
    r·(in·kh·kw + out) multiply-adds instead of out·in·kh·kw.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode:
            as nn.Conv2d (padding "same"/"valid" included; "same" needs stride 1).
        rank: r, in [1, min(out_channels, in_channels·kh·kw)].
        groups: must be 1 (a grouped kernel is not one matrix); kept so that the arguments after
            `rank` are in nn.Conv2d's order.
        core: "diag" (S is a vector of r scales) or "full" (S is a trainable r×r matrix).

    The reshaped kernel is a `FactoredModule`'s W with in_features = in_channels·kh·kw and
    out_features = out_channels: U (out, r), S (r,) or (r, r), V (in·kh·kw, r), bias (out,), and
    the frozen components of rank growth (`grow`, `freeze`). The initialization, the `rank`
    bookkeeping, rank growth and the checkpoint layout (a state dict saved at one rank loads into
    a module built at another) are FactoredModule's, shared with LowRankLinear. The default init
    gives ‖K‖_F² = out/3, as nn.Conv2d's default init does on average.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        core: str = "diag",
        device=None,
        dtype=None,
    ) -> None:
        in_channels = _check_features("in_channels", in_channels)
        out_channels = _check_features("out_channels", out_channels)
        kernel_size = _pair("kernel_size", kernel_size, 1)
        stride = _pair("stride", stride, 1)
        dilation = _pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"argument 'padding' must be 'same', 'valid', an int or a pair, got {padding!r}"
                )
            if padding == "same" and stride != (1, 1):
                raise ValueError("argument 'padding': 'same' is not supported with stride != 1")
        else:
            padding = _pair("padding", padding, 0)
        if isinstance(groups, bool) or groups != 1:
            raise ValueError(
                f"argument 'groups' must be 1, got {groups!r}: a grouped kernel is block-diagonal, "
                "not one low-rank matrix"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"argument 'padding_mode' must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        super().__init__(
            in_channels * kernel_size[0] * kernel_size[1],
            out_channels,
            rank,
            bias,
            core=core,
            device=device,
            dtype=dtype,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = 1
        self.padding_mode = padding_mode

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """F.pad widths (left, right, top, bottom) for the non-"zeros" padding modes."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            widths = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                total = d * (k - 1)
                widths += [total // 2, total - total // 2]  # the extra one on the right, as Conv2d
            return tuple(widths)
        height, width = self.padding
        return (width, width, height, height)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kind = ops.tensor_kind(input)
        if kind is not None:
            raise RuntimeError(f"argument 'input' is {kind}; a dense (strided) tensor is expected")
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(
                f"argument 'input' must be (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(input.shape)}"
            )
        U, S, V = self.factors()
        basis = V.T.reshape(V.shape[1], self.in_channels, *self.kernel_size)
        mix = U * S if S.dim() == 1 else U @ S
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._explicit_padding(), mode=self.padding_mode)
            padding = 0
        hidden = F.conv2d(input, basis, None, self.stride, padding, self.dilation)
        return F.conv2d(hidden, mix[:, :, None, None], self.bias)

    def _weight_shape(self) -> tuple[int, int, int, int]:
        """The dense kernel's (out, in, kh, kw)."""
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
        allow_larger: bool = False,
    ) -> LowRankConv2d:
        """Truncated SVD (in float64) of conv's kernel reshaped to (out, in·kh·kw).

        Exact at full rank to float tolerance. Give `rank`, or `energy` to keep the smallest rank
        holding that fraction of Σσ², or neither for full rank min(out, in·kh·kw) (an exact
        conversion, which needs allow_larger).

        Break-even rank: the factors hold r·(out + in·kh·kw) + r numbers (core="diag"; + r² for
        "full") against out·in·kh·kw in the kernel; a rank above the largest that is no larger
        (`lowrank_ext.nn.break_even_rank(in·kh·kw, out, core)`) raises `LargerThanDenseError`
        (a ValueError) unless `allow_larger=True`.

        Raises TypeError (not an nn.Conv2d, a kernel that is not real floating point),
        ValueError (groups != 1, a lazy or meta conv, a kernel holding NaN/inf, rank/energy out
        of range or both given, a rank above the break-even rank without allow_larger).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"argument 'conv' must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"argument 'conv' has groups={conv.groups}; only groups=1 has a single kernel "
                "matrix to factorize"
            )
        what = "the weight of argument 'conv'"
        kernel = check_matrix(conv.weight, what)
        matrix = kernel.reshape(conv.out_channels, -1)
        rank, U, sigma, V = factorize(matrix, rank, energy, core, allow_larger, what)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            rank,
            conv.stride,
            conv.padding,
            conv.dilation,
            1,
            conv.bias is not None,
            conv.padding_mode,
            core=core,
            device=kernel.device,
            dtype=kernel.dtype,
        )
        module._copy_svd(U, sigma, V, conv.bias)
        return module

    def to_conv2d(self) -> nn.Conv2d:
        """A dense nn.Conv2d with the same function."""
        weight = self.weight.detach()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        return self._copy_into_dense(conv, weight)

    def _repr_shape(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"

    def _repr_options(self) -> str:
        padding = repr(self.padding) if isinstance(self.padding, str) else self.padding
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return f", stride={self.stride}, padding={padding}, dilation={self.dilation}{mode}"
