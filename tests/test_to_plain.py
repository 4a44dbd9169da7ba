"""to_plain: low-rank modules replaced by standard torch modules with the same function.

Each module kind and state, the carried training state and bad input; the whole-model checks
where lowrank_ext is absent (pickles, ONNX, transformers models) are in test_to_plain_export.py.
"""

import copy

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention, convert, to_plain

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _randomize(layer, generator=None):
    """Generic (non-orthonormal) factors and bias, so no fold can pass by accident."""
    with torch.no_grad():
        for tensor in (layer.U, layer.S, layer.V, layer.bias):
            if tensor is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=F64))
    return layer


def assert_plain(model):
    """No module of `model` is (or derives from) a lowrank_ext class."""
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            assert not cls.__module__.startswith("lowrank_ext"), (name, cls)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _plain_pair_checks(plain, layer):
    """Shape, dtype and parameter count of the pair replacing `layer` (rank r)."""
    assert isinstance(plain, nn.Sequential) and len(plain) == 2
    first, second = plain
    assert first.bias is None and (second.bias is None) == (layer.bias is None)
    assert first.weight.dtype == second.weight.dtype == layer.V.dtype
    r, bias = layer.rank, layer.out_features if layer.bias is not None else 0
    assert _count(plain) == r * (layer.in_features + layer.out_features) + bias
    # The low-rank layer stores its frozen components as buffers; all its scales fold away.
    frozen = [layer.U_frozen, layer.V_frozen, layer.S_frozen]
    stored = _count(layer) + sum(t.numel() for t in frozen if t is not None)
    scales = sum(t.numel() for t in (layer.S, layer.S_frozen) if t is not None)
    assert _count(plain) == stored - scales


@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)])
def test_linear(core, bias, shape):
    torch.manual_seed(0)
    layer = _randomize(LowRankLinear(6, 5, 3, bias=bias, core=core, dtype=F64))
    model = nn.Sequential(layer)
    x = torch.randn(shape, dtype=F64)
    expected = model(x)
    assert to_plain(model) is model
    assert_plain(model)
    _plain_pair_checks(model[0], layer)
    assert isinstance(model[0][0], nn.Linear) and model[0][0].out_features == 3
    torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize("freeze_scales", [False, True])
def test_grown_linear(freeze_scales):
    generator = torch.Generator().manual_seed(1)
    layer = _randomize(LowRankLinear(7, 6, 2, dtype=F64), generator)
    layer.grow(2, freeze_scales=freeze_scales, scale_init=0.7, generator=generator)
    with torch.no_grad():  # active columns off the orthonormal start: the projection matters
        layer.U.add_(torch.randn(layer.U.shape, generator=generator, dtype=F64))
        layer.V.add_(torch.randn(layer.V.shape, generator=generator, dtype=F64))
    assert layer.frozen_rank == 2 and layer.rank == 4
    model = nn.Sequential(layer)
    x = torch.randn(5, 7, dtype=F64)
    expected = model(x)
    to_plain(model)
    assert_plain(model)
    _plain_pair_checks(model[0], layer)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_frozen_at_full_rank():
    """freeze() at full rank leaves U, V None: the pair comes from the frozen buffers alone."""
    layer = _randomize(LowRankLinear(4, 3, 3, dtype=F64))
    layer.freeze(freeze_scales=True)
    assert layer.U is None and layer.S is None
    model = nn.Sequential(layer)
    x = torch.randn(2, 4, dtype=F64)
    expected = model(x)
    to_plain(model)
    torch.testing.assert_close(model(x), expected, **TOL)
    first, second = model[0]
    assert _count(model) == 3 * (4 + 3) + 3
    # Only the bias was trainable: both factors are frozen, the bias is not.
    assert not first.weight.requires_grad and not second.weight.requires_grad
    assert second.bias.requires_grad


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 2), stride=2, padding=(1, 2)),
    dict(kernel_size=3, dilation=(2, 1), padding=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding="same", padding_mode="zeros"),  # uneven "same" padding
    dict(kernel_size=3, padding="valid", stride=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="replicate", core="full"),
    dict(kernel_size=(3, 1), padding=(2, 1), stride=2, dilation=2, padding_mode="circular"),
]


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items())
)
@pytest.mark.parametrize("batched", [True, False])
def test_conv2d(case, batched):
    torch.manual_seed(0)
    case = dict(case)
    kernel_size = case.pop("kernel_size")
    layer = _randomize(LowRankConv2d(3, 5, kernel_size, 4, dtype=F64, **case))
    model = nn.Sequential(layer)
    x = torch.randn((2, 3, 9, 8) if batched else (3, 9, 8), dtype=F64)
    expected = model(x)
    to_plain(model)
    assert_plain(model)
    _plain_pair_checks(model[0], layer)
    first, second = model[0]
    assert isinstance(first, nn.Conv2d) and first.out_channels == 4
    assert (first.stride, first.dilation, first.padding_mode) == (
        layer.stride,
        layer.dilation,
        layer.padding_mode,
    )
    assert second.kernel_size == (1, 1)
    torch.testing.assert_close(model(x), expected, **TOL)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(kdim=5, vdim=3, batch_first=True),
        dict(add_bias_kv=True, add_zero_attn=True, core="full"),
        dict(bias=False, batch_first=True),
    ],
)
def test_attention(options):
    torch.manual_seed(0)
    E, heads, rank = 8, 2, 3
    attention = LowRankMultiheadAttention(E, heads, rank, dtype=F64, **options)
    for projection in attention.children():
        _randomize(projection)
    low_rank_count = _count(attention)
    model = nn.ModuleDict({"attn": attention})
    batch_first = options.get("batch_first", False)
    kdim, vdim = options.get("kdim", E), options.get("vdim", E)
    shape = (lambda L, d: (2, L, d)) if batch_first else (lambda L, d: (L, 2, d))
    q = torch.randn(shape(4, E), dtype=F64)
    k, v = torch.randn(shape(6, kdim), dtype=F64), torch.randn(shape(6, vdim), dtype=F64)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = torch.ones(4, 6, dtype=torch.bool).triu(1)
    calls = [(q, k, v, {}), (q, k, v, dict(key_padding_mask=padding, attn_mask=causal))]
    if kdim == vdim == E:
        calls.append((q, q, q, dict(need_weights=False)))  # self-attention: one fused in_proj
    expected = [attention(a, b, c, **kw) for a, b, c, kw in calls]
    to_plain(model)
    assert_plain(model)
    plain = model["attn"]
    assert type(plain) is nn.MultiheadAttention
    for (a, b, c, kw), (output, weights) in zip(calls, expected):
        got_output, got_weights = plain(a, b, c, **kw)
        torch.testing.assert_close(got_output, output, **TOL)
        if weights is not None:
            torch.testing.assert_close(got_weights, weights, **TOL)
    # The documented cost: dense projections E·(E + kdim + vdim) + E², the same biases.
    biases = 4 * E if options.get("bias", True) else 0
    biases += 2 * E if options.get("add_bias_kv") else 0
    assert _count(plain) == E * (E + kdim + vdim) + E * E + biases
    scales = (rank * rank if options.get("core") == "full" else rank) * len(
        list(attention.children())
    )
    factors = sum(rank * (p.in_features + p.out_features) for p in attention.children())
    assert low_rank_count == factors + scales + biases


def test_encoder_with_only_feed_forward_converted():
    """Dense attention keeps nn.TransformerEncoder's nested-tensor path open, and that path reads
    linear1.weight: to_plain closes it, so eval with a padding mask still runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    convert(model, rank=3, target_modules=["linear1", "linear2"])
    assert model.use_nested_tensor
    x = torch.randn(2, 5, 8, dtype=F64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=padding)
        to_plain(model)
        got = model(x, src_key_padding_mask=padding)
    assert not model.use_nested_tensor
    # The low-rank model took the nested-tensor path, which zeroes padded positions.
    torch.testing.assert_close(got[~padding], expected[~padding], **TOL)


def test_training_state_and_sharing():
    torch.manual_seed(0)
    shared = LowRankLinear(4, 4, 2, dtype=F64)
    frozen = LowRankLinear(4, 4, 2, dtype=F64).requires_grad_(False)
    scales_only = LowRankLinear(4, 4, 2, dtype=F64)  # OIALR's phase: U, V frozen, S trains
    scales_only.U.requires_grad_(False)
    scales_only.V.requires_grad_(False)
    model = nn.Sequential(shared, frozen, scales_only, shared)
    model.train()
    frozen.eval()
    to_plain(model)
    assert model[0] is model[3]  # one replacement under both names
    assert model[0].training and not model[1].training and not model[1][0].training
    assert not any(p.requires_grad for p in model[1].parameters())
    assert all(p.requires_grad for p in model[0].parameters())
    first, second = model[2]
    assert not first.weight.requires_grad
    assert second.weight.requires_grad and second.bias.requires_grad


class _Subclass(LowRankLinear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_bad_input():
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module, got dict"):
        to_plain({})
    for layer in (
        LowRankLinear(4, 4, 2),
        LowRankConv2d(2, 3, 3, 2),
        LowRankMultiheadAttention(4, 2, 2),
    ):
        with pytest.raises(ValueError, match=f"itself a {type(layer).__name__}.*wrap it"):
            to_plain(layer)
    # A subclass may compute something else: refused, and the model is left as it was.
    first, odd = LowRankLinear(4, 4, 2), _Subclass(4, 4, 2)
    model = nn.Sequential(first, nn.Sequential(odd))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"module '1.0' is a .*_Subclass.*replace it first"):
        to_plain(model)
    assert model[0] is first and model[1][0] is odd
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in after.items():  # tensors, and the layers' _extra_state dicts
        assert torch.equal(value, state[key]) if torch.is_tensor(value) else value == state[key]
    # No low-rank module: nothing changes.
    dense = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    children = list(dense)
    assert to_plain(dense) is dense and list(dense) == children
