"""LowRankMultiheadAttention against nn.MultiheadAttention."""

import itertools

import pytest
import torch
from torch import nn

from lowrank_ext.nn import LowRankMultiheadAttention

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
E, HEADS, N, L, S = 8, 2, 3, 4, 6


def _dense(**options):
    """nn.MultiheadAttention with nonzero biases (PyTorch initializes the projection ones to 0)."""
    attention = nn.MultiheadAttention(E, HEADS, dtype=F64, **options)
    with torch.no_grad():
        for name, parameter in attention.named_parameters():
            if "bias" in name:
                parameter.normal_()
    return attention


def _inputs(attention, generator):
    def seq(length, features):
        shape = (N, length, features) if attention.batch_first else (length, N, features)
        return torch.randn(shape, dtype=F64, generator=generator)

    return seq(L, E), seq(S, attention.kdim), seq(S, attention.vdim)


def _masks(generator):
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    return [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": torch.randn(L, S, dtype=F64, generator=generator)},
        {
            "attn_mask": torch.rand(N * HEADS, L, S, generator=generator) < 0.3,
            "key_padding_mask": torch.randn(N, S, dtype=F64, generator=generator),
        },
    ]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"kdim": 5, "vdim": 7},
        {"bias": False, "add_bias_kv": True},
        {"add_zero_attn": True, "kdim": 3, "vdim": 3},
        {"add_bias_kv": True, "add_zero_attn": True},
    ],
)
def test_full_rank_matches_multihead_attention(batch_first, options):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dense = _dense(batch_first=batch_first, **options)
    core = "full" if batch_first else "diag"  # both cores over the grid
    attention = LowRankMultiheadAttention.from_multihead_attention(
        dense, core=core, allow_larger=True
    )
    assert attention.packed_in_proj == ("kdim" not in options)
    query, key, value = _inputs(dense, g)
    for masks, need_weights, average in itertools.product(_masks(g), [True, False], [True, False]):
        kwargs = dict(masks, need_weights=need_weights, average_attn_weights=average)
        expected, expected_weights = dense(query, key, value, **kwargs)
        output, weights = attention(query, key, value, **kwargs)
        torch.testing.assert_close(output, expected, **TOL)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, **TOL)
        else:
            assert weights is None


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_unbatched_and_merge_back(batch_first):
    torch.manual_seed(0)
    dense = _dense(batch_first=batch_first)
    attention = LowRankMultiheadAttention.from_multihead_attention(dense, allow_larger=True)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), dtype=F64)
    single = x[0] if batch_first else x[:, 0]  # one unbatched (L, E) sequence
    padding = torch.tensor([False, False, True, False])
    cases = [((x, x, x), {}), ((single,) * 3, {}), ((single,) * 3, {"key_padding_mask": padding})]
    for inputs, masks in cases:
        for need_weights in (True, False):
            kwargs = dict(masks, need_weights=need_weights, average_attn_weights=False)
            expected = dense(*inputs, **kwargs)
            output = attention(*inputs, **kwargs)
            torch.testing.assert_close(output[0], expected[0], **TOL)
            if need_weights:
                torch.testing.assert_close(output[1], expected[1], **TOL)
    merged = attention.to_multihead_attention()
    assert type(merged) is nn.MultiheadAttention and merged.batch_first == batch_first
    torch.testing.assert_close(merged(x, x, x)[0], attention(x, x, x)[0], **TOL)


def test_gradients_match_multihead_attention():
    torch.manual_seed(0)
    dense = _dense(kdim=5, vdim=6, batch_first=True)
    attention = LowRankMultiheadAttention.from_multihead_attention(
        dense, core="full", allow_larger=True
    )
    query = torch.randn(N, L, E, dtype=F64, requires_grad=True)
    key = torch.randn(N, S, 5, dtype=F64, requires_grad=True)
    value = torch.randn(N, S, 6, dtype=F64, requires_grad=True)
    cotangent = torch.randn(N, L, E, dtype=F64)
    expected = torch.autograd.grad(dense(query, key, value)[0], (query, key, value), cotangent)
    actual = torch.autograd.grad(attention(query, key, value)[0], (query, key, value), cotangent)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, **TOL)
    # The gradient of the output bias is the cotangent summed over batch and sequence.
    attention(query, key, value)[0].backward(cotangent)
    torch.testing.assert_close(attention.out_proj.bias.grad, cotangent.sum((0, 1)), **TOL)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_and_causal_hint_follow_pytorch(need_weights):
    # Same RNG stream: with the same seed, dropout drops the same attention weights.
    torch.manual_seed(0)
    dense = _dense(dropout=0.3, batch_first=True)
    attention = LowRankMultiheadAttention.from_multihead_attention(dense, allow_larger=True)
    x = torch.randn(N, L, E, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    for kwargs in ({}, {"attn_mask": causal, "is_causal": True}):
        torch.manual_seed(1)
        expected = dense(x, x, x, need_weights=need_weights, **kwargs)[0]
        torch.manual_seed(1)
        output = attention(x, x, x, need_weights=need_weights, **kwargs)[0]
        torch.testing.assert_close(output, expected, **TOL)
    undropped = attention.eval()(x, x, x, need_weights=need_weights)[0]
    assert not torch.allclose(undropped, output)
    torch.testing.assert_close(undropped, dense.eval()(x, x, x)[0], **TOL)
    with pytest.raises(ValueError, match="'is_causal' .* needs the attn_mask"):
        attention(x, x, x, is_causal=True)


def test_truncation_and_energy_per_projection():
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(E, HEADS, dtype=F64)
    attention = LowRankMultiheadAttention.from_multihead_attention(dense, rank=3)
    assert attention.ranks == {"in_proj": 3, "out_proj": 3}
    for weight, layer in (
        (dense.in_proj_weight, attention.in_proj),
        (dense.out_proj.weight, attention.out_proj),
    ):
        sigma = torch.linalg.svdvals(weight.detach())
        error = torch.linalg.matrix_norm(layer.weight - weight) ** 2
        assert error.item() == pytest.approx((sigma[3:] ** 2).sum().item(), rel=1e-10)
    by_energy = LowRankMultiheadAttention.from_multihead_attention(
        dense, energy=0.9, allow_larger=True
    )
    for weight, name in ((dense.in_proj_weight, "in_proj"), (dense.out_proj.weight, "out_proj")):
        power = torch.linalg.svdvals(weight.detach()) ** 2
        expected = int((torch.cumsum(power, 0) / power.sum() < 0.9).sum()) + 1
        assert by_energy.ranks[name] == expected


def test_init_follows_multihead_attention():
    torch.manual_seed(0)
    attention = LowRankMultiheadAttention(E, HEADS, 4, kdim=5, vdim=6, add_bias_kv=True)
    # xavier_uniform's expected ‖W‖_F² is out·in·2/(in + out); LowRankLinear's S sets it exactly.
    for name, in_features in (("q_proj", E), ("k_proj", 5), ("v_proj", 6)):
        norm2 = torch.linalg.matrix_norm(getattr(attention, name).weight).item() ** 2
        assert norm2 == pytest.approx(2 * E * in_features / (E + in_features), rel=1e-5)
        assert torch.count_nonzero(getattr(attention, name).bias) == 0
    assert torch.count_nonzero(attention.out_proj.bias) == 0
    assert attention.bias_k.shape == (1, 1, E) and attention.bias_k.std() > 0


def test_state_dict_loads_at_other_ranks():
    torch.manual_seed(0)
    saved = LowRankMultiheadAttention(E, HEADS, 2, core="full")
    with torch.no_grad():
        saved.out_proj.bias.normal_()
    other = LowRankMultiheadAttention(E, HEADS, 5, core="full")
    other.load_state_dict(saved.state_dict())
    assert other.ranks == {"in_proj": 2, "out_proj": 2}
    x = torch.randn(L, N, E)
    assert torch.equal(other(x, x, x)[0], saved(x, x, x)[0])
    separate = LowRankMultiheadAttention(E, HEADS, 2, kdim=4, vdim=4, core="full")
    with pytest.raises(RuntimeError, match="(?s)Missing key.*q_proj.U.*Unexpected key.*in_proj.U"):
        separate.load_state_dict(saved.state_dict())


def test_repr_and_transformer_hooks():
    attention = LowRankMultiheadAttention(E, HEADS, 2, kdim=4, vdim=3, batch_first=True)
    text = repr(attention)
    assert text.startswith(
        "LowRankMultiheadAttention(\n  embed_dim=8, num_heads=2, kdim=4, vdim=3, batch_first=True"
    )
    assert "(k_proj): LowRankLinear(in_features=4, out_features=8, rank=2" in text
    assert attention.in_proj_bias.shape == (3 * E,)
    assert LowRankMultiheadAttention(E, HEADS, 2, bias=False).in_proj_bias is None


def test_bad_arguments_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"k_proj \(3 → 8\): argument 'rank' .* \[1, 3\], got 4"):
        LowRankMultiheadAttention(E, HEADS, 4, kdim=3, vdim=8)
    with pytest.raises(ValueError, match=r"argument 'embed_dim' \(8\) must be divisible by"):
        LowRankMultiheadAttention(E, 3, 2)
    with pytest.raises(TypeError, match="must be an nn.MultiheadAttention, got Linear"):
        LowRankMultiheadAttention.from_multihead_attention(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"in_proj \(8 → 24\): argument 'rank'"):
        LowRankMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(E, HEADS), rank=9)
    attention = LowRankMultiheadAttention(E, HEADS, 2)
    x = torch.randn(L, N, E)
    cases = [
        (
            (torch.randn(L, N, 7), x, x),
            {},
            "argument 'query' must be 3-D like query with last dim 8",
        ),
        ((x, torch.randn(S, N, E), x), {}, "'key' and 'value' must have the same sequence length"),
        ((x, x, torch.randn(L, N + 1, E)), {}, "must share the batch size"),
        ((x,) * 3, {"key_padding_mask": torch.zeros(N, L + 1)}, r"must have shape \(3, 4\)"),
        ((x,) * 3, {"attn_mask": torch.zeros(2, L, L)}, r"must have shape \(4, 4\) or \(6, 4, 4\)"),
        ((x[0, 0],) * 3, {}, "argument 'query' must be 3-D .* or 2-D"),
    ]
    for inputs, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attention(*inputs, **kwargs)
    with pytest.raises(TypeError, match="argument 'attn_mask' must be a bool or floating"):
        attention(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
