"""LowRankConv2d: a Conv2d whose kernel, reshaped to (out, in·kh·kw), lives only as U S Vᵀ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .nn import _CORES, _FROZEN, LowRankLinear, _check_features, _check_rank

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _linear_over(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` without copying them.

    Hands any 2-D weight (a reshaped conv kernel, a slice of a packed projection) to
    `LowRankLinear.from_linear`, so every module factorizes with the same SVD and rank rules.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


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


class LowRankConv2d(nn.Module):
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

    Parameters and buffers mean what they mean in `LowRankLinear` with in_features =
    in_channels·kh·kw and out_features = out_channels: U (out, r), S (r,) or (r, r),
    V (in·kh·kw, r), bias (out,), and the frozen components of rank growth (`grow`, `freeze`).
    The initialization, the `rank` bookkeeping, rank growth and the checkpoint layout (a state
    dict saved at one rank loads into a module built at another) are LowRankLinear's own code.
    The default init gives ‖K‖_F² = out/3, as nn.Conv2d's default init does on average.
    """

    # The reshaped kernel is a LowRankLinear's W: share its factor bookkeeping as is (it reads
    # in_features and out_features, set below to the reshaped kernel's sizes).
    _core_shape = LowRankLinear._core_shape
    frozen_rank = LowRankLinear.frozen_rank
    active_rank = LowRankLinear.active_rank
    rank = LowRankLinear.rank
    reset_parameters = LowRankLinear.reset_parameters
    factors = LowRankLinear.factors
    grow = LowRankLinear.grow
    freeze = LowRankLinear.freeze
    _refine = LowRankLinear._refine
    _frozen_svd = LowRankLinear._frozen_svd
    get_extra_state = LowRankLinear.get_extra_state
    set_extra_state = LowRankLinear.set_extra_state
    _adopt_saved_layout = LowRankLinear._adopt_saved_layout
    _plain_layout = LowRankLinear._plain_layout
    _grown_layout = LowRankLinear._grown_layout

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
        super().__init__()
        self.in_channels = _check_features("in_channels", in_channels)
        self.out_channels = _check_features("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"argument 'padding' must be 'same', 'valid', an int or a pair, got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("argument 'padding': 'same' is not supported with stride != 1")
            self.padding = padding
        else:
            self.padding = _pair("padding", padding, 0)
        if isinstance(groups, bool) or groups != 1:
            raise ValueError(
                f"argument 'groups' must be 1, got {groups!r}: a grouped kernel is block-diagonal, "
                "not one low-rank matrix"
            )
        self.groups = 1
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"argument 'padding_mode' must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        if core not in _CORES:
            raise ValueError(f"argument 'core' must be one of {_CORES}, got {core!r}")
        self.core = core
        self.in_features = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.out_features = out_channels
        rank = _check_rank(rank, self.in_features, self.out_features)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_channels, rank, **factory))
        self.S = nn.Parameter(torch.empty(self._core_shape(rank), **factory))
        self.V = nn.Parameter(torch.empty(self.in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        for name in _FROZEN:
            self.register_buffer(name, None)
        self.reset_parameters()

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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        problem = self._adopt_saved_layout(state_dict, prefix)
        if problem:
            error_msgs.append(problem)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw), built on demand; forward never uses it."""
        W = reference.dense_weight(*self.factors())
        return W.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        rank: int | None = None,
        energy: float | None = None,
        *,
        core: str = "diag",
    ) -> LowRankConv2d:
        """Truncated SVD (in float64) of conv's kernel reshaped to (out, in·kh·kw).

        Exact at full rank to float tolerance. Give `rank`, or `energy` to keep the smallest rank
        holding that fraction of Σσ², or neither for full rank min(out, in·kh·kw).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"argument 'conv' must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"argument 'conv' has groups={conv.groups}; only groups=1 has a single kernel "
                "matrix to factorize"
            )
        kernel = conv.weight
        if isinstance(kernel, nn.parameter.UninitializedParameter):
            raise ValueError("argument 'conv' is lazy and not initialized: run a forward first")
        flat = _linear_over(kernel.reshape(conv.out_channels, -1), conv.bias)
        factored = LowRankLinear.from_linear(flat, rank, energy, core=core)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            factored.rank,
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
        with torch.no_grad():
            for name in ("U", "S", "V", "bias"):
                if getattr(module, name) is not None:
                    getattr(module, name).copy_(getattr(factored, name))
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
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        frozen = f", frozen={self.frozen_rank}" if self.frozen_rank else ""
        padding = repr(self.padding) if isinstance(self.padding, str) else self.padding
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}, padding={padding}, "
            f"dilation={self.dilation}{mode}, core={self.core!r}, "
            f"bias={self.bias is not None}{frozen}"
        )
