"""to_plain: every low-rank module of a model replaced by standard torch modules, in place.

The result computes the same function with `torch.nn` classes only, so it can be pickled whole
(`torch.save(model)`), loaded and run in a process that never imports lowrank_ext, and exported
with `torch.onnx.export` (no custom op in the graph).

- LowRankLinear (in → out, rank r) → nn.Sequential(nn.Linear(in, r, bias=False),
  nn.Linear(r, out, bias)): first weight Vᵀ (r, in), second weight U·S (out, r).
- LowRankConv2d → nn.Sequential(nn.Conv2d(in, r, (kh, kw), stride, padding, dilation,
  padding_mode, bias=False), nn.Conv2d(r, out, 1, bias)): first kernel Vᵀ reshaped to
  (r, in, kh, kw), second kernel U·S as (out, r, 1, 1). Exact: the dense kernel is
  K[o, c, i, j] = W[o, c·kh·kw + i·kw + j] (row-major), so K = Σₖ (U S)[o, k] · Vᵀ[k] reshaped,
  and by linearity conv(x, K) = conv₁ₓ₁(conv(x, Vᵀ reshaped), U S); stride, padding and
  dilation act on the first convolution only, the 1×1 one being pointwise.
- LowRankMultiheadAttention → nn.MultiheadAttention with dense projections, as `merge` builds
  it. Its callers (nn.TransformerEncoderLayer, user models) call it with nn.MultiheadAttention's
  forward contract; that class is the only torch module with it, and it holds dense weights (no
  torch container runs factored projections inside an attention), so the attention is not kept
  factored: it costs E·(E + kdim + vdim) + E² weights
  (4E² when kdim = vdim = E) instead of Σ r·(in + out) + r over its projections (r·(in + out)
  + r² with core="full"); biases are the same.

Why S goes into the second factor (W = U S Vᵀ = (U S)·Vᵀ rather than U·(S Vᵀ)): the fused op
computes t = x V first and scales afterwards, so with Vᵀ as the first weight the first layer
computes the op's t with the same product, and with orthonormal V (as conversion and growth
leave it) the hidden activations are bounded by ‖x‖ whatever the scales, so half-precision
hiddens do not overflow when σ is large. U·S (for core="full" the product U @ S with the r×r
core) is formed once in float64 and rounded once to the factors' dtype. A grown layer's folded
factors are `factors()`: its frozen components and its active ones projected out of them.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import LowRankMultiheadAttention
from .conv import LowRankConv2d
from .convert import _carry_training_state, _swap
from .factored import FactoredModule
from .linear import LowRankLinear

__all__ = ["to_plain"]

_HANDLED = (LowRankLinear, LowRankConv2d, LowRankMultiheadAttention)


def to_plain(model: nn.Module) -> nn.Module:
    """Replace every low-rank module of `model` by standard torch modules, in place.

    LowRankLinear → nn.Sequential of two nn.Linear, LowRankConv2d → nn.Sequential of two
    nn.Conv2d (the factors, S folded into the second: the module doc says why), and
    LowRankMultiheadAttention → nn.MultiheadAttention with dense weights (as `merge`). Every
    replacement computes the same function for inputs of any shape the low-rank module takes,
    with parameters in the factors' dtype and device. A factorized layer of rank r has
    r·(in + out) weights plus its bias in plain form (S folded in: r fewer than the low-rank
    module with core="diag", r² fewer with core="full").

    State: each replacement keeps the replaced module's training flag. A plain weight
    requires grad if a trainable tensor it was folded from does: the first factor from V, the
    second from U and S, the bias from the bias (so a module whose parameters were all frozen
    stays frozen, and one with frozen U, V and trainable S gets a trainable second factor). The
    frozen components of a grown layer are folded into the same weights as its active ones, so
    that split is not kept. Hooks on replaced modules are not carried over. A module registered
    under several names is replaced under all of them. The state_dict keys change
    ("fc.U", "fc.S", "fc.V" → "fc.0.weight", "fc.1.weight"; "fc.bias" → "fc.1.bias"). Code that
    reads a replaced linear layer's `.weight` (an nn.Sequential has none) needs `merge` instead.
    The inference fast paths of nn.TransformerEncoderLayer and nn.TransformerEncoder read
    linear1.weight and linear2.weight: a layer whose linear1 or linear2 becomes a pair gets
    `activation_relu_or_gelu = 0` and its encoder `use_nested_tensor = False`, which send them
    through their regular forward (the same function; in eval mode with a padding mask the
    outputs at padded positions are computed instead of zeroed as the nested-tensor path does).

    Args:
        model: any nn.Module; its low-rank submodules are replaced (not the root itself). A
            model without low-rank modules is returned unchanged.

    Returns the model. All-or-nothing: every replacement is built before any is swapped in, so on
    error the model is left as it was.

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: `model` is itself a low-rank module (it cannot be replaced in place; wrap it,
            e.g. `to_plain(nn.Sequential(layer))[0]`), or the model holds a subclass of a
            low-rank module (or a bare FactoredModule) whose forward to_plain cannot know.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (FactoredModule, LowRankMultiheadAttention)):
        raise ValueError(
            f"argument 'model' is itself a {type(model).__name__}, which cannot be replaced in "
            "place: wrap it, e.g. to_plain(nn.Sequential(layer))[0]"
        )
    replacements, inside_attention = {}, set()
    for name, module in model.named_modules():
        if id(module) in inside_attention:
            continue
        if not isinstance(module, (FactoredModule, LowRankMultiheadAttention)):
            continue
        # Exact types only: a subclass may change forward, and a plain copy of the base class's
        # function would then be silently wrong.
        if type(module) not in _HANDLED:
            raise ValueError(
                f"module {name!r} is a {type(module).__module__}.{type(module).__qualname__}, a "
                "subclass of a low-rank module: to_plain knows the function of LowRankLinear, "
                "LowRankConv2d and LowRankMultiheadAttention only; replace it first"
            )
        if isinstance(module, LowRankMultiheadAttention):
            plain = module.to_multihead_attention()
            inside_attention.update(id(child) for child in module.modules())
            _carry_training_state(module, plain)
        else:
            plain = _two_factors(module)
        replacements[id(module)] = plain
    slow_paths = _fast_paths_reading_weights(model, replacements)
    _swap(model, replacements)
    for module in slow_paths:
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        else:
            module.activation_relu_or_gelu = 0
    return model


def _fast_paths_reading_weights(model: nn.Module, replacements: dict) -> list[nn.Module]:
    """The nn.TransformerEncoderLayer/Encoder modules whose fused inference path would read
    `.weight` of a linear1/linear2 that becomes an nn.Sequential pair."""
    layers = [
        module
        for module in model.modules()
        if isinstance(module, nn.TransformerEncoderLayer)
        and (id(module.linear1) in replacements or id(module.linear2) in replacements)
    ]
    encoders = [
        module
        for module in model.modules()
        if isinstance(module, nn.TransformerEncoder)
        and any(layer in module.layers for layer in layers)
    ]
    return layers + encoders


def _folded(module: FactoredModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vᵀ (r, in_features), U·S (out_features, r)) in the factors' dtype, U·S formed in float64."""
    with torch.no_grad():
        U, S, V = module.factors()
        dtype = U.dtype
        U64 = U.double()
        mix = U64 * S.double() if S.dim() == 1 else U64 @ S.double()
        return V.T.clone(), mix.to(dtype)


def _two_factors(module: FactoredModule) -> nn.Sequential:
    """The nn.Sequential pair of a LowRankLinear or LowRankConv2d, state carried over."""
    first_weight, second_weight = _folded(module)
    rank, bias = module.rank, module.bias is not None
    factory = {"device": first_weight.device, "dtype": first_weight.dtype}
    if isinstance(module, LowRankConv2d):
        first = nn.Conv2d(
            module.in_channels,
            rank,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
            **factory,
        )
        second = nn.Conv2d(rank, module.out_channels, 1, bias=bias, **factory)
        first_weight = first_weight.reshape(rank, module.in_channels, *module.kernel_size)
        second_weight = second_weight[:, :, None, None]
    else:
        first = nn.Linear(module.in_features, rank, bias=False, **factory)
        second = nn.Linear(rank, module.out_features, bias=bias, **factory)
    with torch.no_grad():
        first.weight.copy_(first_weight)
        second.weight.copy_(second_weight)
        if bias:
            second.bias.copy_(module.bias)
    plain = nn.Sequential(first, second)
    _carry_training_state(module, plain)
    first.weight.requires_grad_(_trainable(module.V))
    second.weight.requires_grad_(_trainable(module.U, module.S))
    if bias:
        second.bias.requires_grad_(module.bias.requires_grad)
    return plain


def _trainable(*parameters) -> bool:
    """Whether any of the (possibly absent) parameters requires grad."""
    return any(p is not None and p.requires_grad for p in parameters)
