"""transformers' Conv1D (GPT-2's projections, y = x W + b with W stored (in, out)) handled as a
linear layer by convert, merge and LowRankLinear.from_conv1d/to_conv1d (OIALR, spectral and the
CLI: test_conv1d_training_analysis.py)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_gpt2 import CONV1D_NAMES, SHAPES, conv1d_names, gpt2, logits, tokens
from torch import nn

from lowrank_ext import OIALR, LowRankLinear, conversion_summary, convert, merge, ranks

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: no thread-pool wake-ups

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- convert / merge


def test_full_rank_convert_keeps_the_logits_and_merge_restores_conv1d():
    model, ids = gpt2(), tokens()
    reference = copy.deepcopy(model)
    expected = logits(reference, ids)
    convert(model, allow_larger=True)
    assert conv1d_names(model) == []
    assert ranks(model) == {
        name: min(SHAPES[name.split(".", 3)[3]]) for name in CONV1D_NAMES
    }  # fmt: skip
    torch.testing.assert_close(logits(model, ids), expected, **TOL)
    # lm_head is GPT-2's output layer (tied to the embeddings): it stays a dense nn.Linear.
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight

    merge(model)
    assert conv1d_names(model) == CONV1D_NAMES
    torch.testing.assert_close(logits(model, ids), expected, **TOL)
    for name in CONV1D_NAMES:
        merged, original = model.get_submodule(name), reference.get_submodule(name)
        assert (merged.nx, merged.nf) == (original.nx, original.nf)
        assert merged.weight.shape == original.weight.shape and merged.weight.dtype == F64
        torch.testing.assert_close(merged.weight, original.weight, **TOL)
        torch.testing.assert_close(merged.bias, original.bias, rtol=0, atol=0)


def test_float32_conversion_is_exact_to_float32_rounding():
    model, ids = gpt2(torch.float32), tokens()
    expected = logits(model.double(), ids)
    model.float()
    convert(model, allow_larger=True)
    assert all(m.U.dtype == torch.float32 for m in model.modules() if isinstance(m, LowRankLinear))
    torch.testing.assert_close(logits(model, ids).double(), expected, rtol=1e-5, atol=1e-5)


def test_truncated_conversion_targets_every_conv1d_and_factors_the_transpose():
    model, ids = gpt2(), tokens()
    dense = {name: model.get_submodule(name) for name in CONV1D_NAMES}
    convert(model, rank=4)
    assert ranks(model) == dict.fromkeys(CONV1D_NAMES, 4)
    assert type(model.lm_head) is nn.Linear
    for name, conv in dense.items():
        layer = model.get_submodule(name)
        assert layer.dense_kind == "conv1d"
        assert (layer.in_features, layer.out_features) == (conv.nx, conv.nf)
        # The best rank-4 approximation of the (out, in) matrix Wᵀ (Eckart–Young).
        U, sigma, Vh = torch.linalg.svd(conv.weight.detach().T)
        best = U[:, :4] @ torch.diag(sigma[:4]) @ Vh[:4]
        torch.testing.assert_close(layer.weight.detach(), best, **TOL)
    # merge gives back Conv1D modules whose (in, out) weight is (U S Vᵀ)ᵀ of the factors.
    low_rank = logits(model, ids)
    factors = {name: model.get_submodule(name).factors() for name in CONV1D_NAMES}
    merge(model)
    for name, (U, S, V) in factors.items():
        merged = model.get_submodule(name)
        assert type(merged) is Conv1D
        torch.testing.assert_close(merged.weight, (U @ torch.diag(S) @ V.T).T.detach(), **TOL)
    torch.testing.assert_close(logits(model, ids), low_rank, **TOL)


def test_all_linear_and_names_select_conv1d():
    model = convert(gpt2(), rank=3, target_modules="all-linear")
    assert ranks(model) == dict.fromkeys(CONV1D_NAMES, 3)
    model = convert(gpt2(), rank=3, target_modules=["c_fc"])
    assert sorted(ranks(model)) == [n for n in CONV1D_NAMES if n.endswith("c_fc")]
    model = convert(gpt2(), rank=3, target_modules=r"transformer\.h\.1\.attn\.c_.*")
    assert sorted(ranks(model)) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    # Named explicitly, the output layer is converted too (an nn.Linear, untied from wte).
    model = convert(gpt2(), rank=3, target_modules=["lm_head", "mlp.c_proj"])
    assert set(ranks(model)) == {"lm_head", *[n for n in CONV1D_NAMES if n.endswith("mlp.c_proj")]}
    assert model.lm_head.dense_kind == "linear"


def test_rank_pattern_energy_and_exclude_by_conv1d_names():
    model = gpt2()
    weights = {name: model.get_submodule(name).weight.detach() for name in CONV1D_NAMES}
    convert(
        model,
        energy=0.9,
        rank_pattern={r"h\.0\.attn\.c_attn": 2, "c_fc": 5},
        exclude_modules=["mlp.c_proj"],
        allow_larger=True,  # energy 0.9 of a random init needs ranks past break-even
    )
    expected = {}
    for name in CONV1D_NAMES:
        if name.endswith("mlp.c_proj"):
            assert type(model.get_submodule(name)) is Conv1D
            continue
        if name == "transformer.h.0.attn.c_attn":
            expected[name] = 2
        elif name.endswith("c_fc"):
            expected[name] = 5
        else:  # the smallest k with Σ_{i≤k} σᵢ² ≥ 0.9 Σσᵢ², from the float64 spectrum
            power = torch.linalg.svdvals(weights[name]) ** 2
            expected[name] = int((power.cumsum(0) < 0.9 * power.sum()).sum()) + 1
    assert ranks(model) == expected
    assert 1 < expected["transformer.h.1.attn.c_proj"] < 32


def test_gpt2_base_model_follows_the_last_linear_layer_rule():
    # GPT2Model has no LM head (get_output_embeddings() is None): as for nn.Linear models, the
    # linear layer registered last counts as the output layer and stays dense under None.
    model = gpt2().transformer
    convert(model, rank=2)
    assert set(ranks(model)) == set(n.removeprefix("transformer.") for n in CONV1D_NAMES[:-1])
    assert type(model.h[1].mlp.c_proj) is Conv1D


def test_from_conv1d_and_to_conv1d():
    torch.manual_seed(0)
    conv = Conv1D(12, 7).double()  # nf=12 outputs, nx=7 inputs: weight (7, 12)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(4, 5, 7, dtype=F64)
    layer = LowRankLinear.from_conv1d(conv, core="full", allow_larger=True)
    assert (layer.in_features, layer.out_features, layer.rank) == (7, 12, 7)
    assert layer.core == "full" and layer.dense_kind == "conv1d"
    assert layer.weight.shape == (12, 7)  # .weight is (out, in), as for any LowRankLinear
    torch.testing.assert_close(layer(x), x @ conv.weight + conv.bias, **TOL)
    back = layer.to_conv1d()
    assert type(back) is Conv1D and (back.nf, back.nx) == (12, 7) and back.weight.dtype == F64
    torch.testing.assert_close(back.weight, conv.weight, **TOL)
    assert type(layer.to_linear()) is nn.Linear  # to_linear stays available
    assert type(layer.to_dense()) is Conv1D
    # A layer without bias: Conv1D always adds one, so it gets zeros.
    plain = LowRankLinear(7, 12, rank=3, bias=False, dtype=F64)
    conv = plain.to_conv1d()
    torch.testing.assert_close(conv(x), plain(x), **TOL)
    assert not conv.bias.any()
    # energy: the smallest rank holding 50 % of Σσ² of Wᵀ
    layer = LowRankLinear.from_conv1d(back, energy=0.5, allow_larger=True)
    power = torch.linalg.svdvals(back.weight.detach()) ** 2
    assert layer.rank == int((power.cumsum(0) < 0.5 * power.sum()).sum()) + 1


def test_dense_kind_survives_deepcopy_pickle_and_state_dict_round_trips(tmp_path):
    model, ids = gpt2(), tokens()
    convert(model, rank=4)
    name = "transformer.h.1.mlp.c_fc"
    assert "dense_kind" not in str(model.state_dict().keys())  # the state_dict is tensors only
    assert all(
        torch.is_tensor(v) for k, v in model.state_dict().items() if not k.endswith("_extra_state")
    )
    copied = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    # A state_dict saved at rank 4 loads into the same model converted at rank 8.
    rebuilt = convert(gpt2(seed=5), rank=8)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.get_submodule(name).rank == 4
    expected = logits(model, ids)
    for other in (copied, loaded, rebuilt):
        assert other.get_submodule(name).dense_kind == "conv1d"
        torch.testing.assert_close(logits(other, ids), expected, **TOL)
        merge(other)
        assert conv1d_names(other) == CONV1D_NAMES
        torch.testing.assert_close(logits(other, ids), expected, **TOL)


# ---------------------------------------------------------------------------- bad input


def _conv1d_types(model):
    return {name: type(model.get_submodule(name)) for name in CONV1D_NAMES}


@pytest.mark.parametrize(
    "weight, message",
    [
        (nn.UninitializedParameter(), "is lazy and not initialized"),
        (
            nn.Parameter(torch.randn(32, 96, 1, dtype=F64)),
            r"must have a 2-D weight .* \(32, 96, 1\)",
        ),
        (nn.Parameter(torch.randn(96, 32, dtype=F64)), r"shape \(96, 32\), but its nx, nf say"),
    ],
)
def test_a_bad_conv1d_is_refused_by_name_and_the_model_is_unchanged(weight, message):
    model = gpt2()
    before = _conv1d_types(model)
    model.transformer.h[1].attn.c_attn.weight = weight
    with pytest.raises(ValueError, match=rf"target 'transformer\.h\.1\.attn\.c_attn'.*{message}"):
        convert(model, rank=4)
    assert _conv1d_types(model) == before
    with pytest.raises(ValueError, match=rf"argument 'conv1d' .*{message}"):
        LowRankLinear.from_conv1d(model.transformer.h[1].attn.c_attn)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn"):
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), delay=5, frequency=1)


def test_wrong_types_and_a_rank_out_of_range():
    conv = Conv1D(6, 4)
    with pytest.raises(TypeError, match="use from_conv1d for a transformers Conv1D"):
        LowRankLinear.from_linear(conv)
    with pytest.raises(TypeError, match="argument 'conv1d' must be a transformers Conv1D"):
        LowRankLinear.from_conv1d(nn.Linear(4, 6))
    model = gpt2()
    with pytest.raises(ValueError, match=r"cannot convert 'transformer\.h\.0\.attn\.c_proj'"):
        convert(model, rank_pattern={"attn.c_proj": 33}, allow_larger=True)
    assert _conv1d_types(model) == dict.fromkeys(CONV1D_NAMES, Conv1D)


def test_merge_without_transformers_raises_and_changes_nothing(monkeypatch):
    model = convert(gpt2(), rank=4)
    layers = {name: model.get_submodule(name) for name in CONV1D_NAMES}
    # None in sys.modules makes the import fail, as if transformers were not installed.
    monkeypatch.setitem(sys.modules, "transformers.pytorch_utils", None)
    with pytest.raises(ImportError, match="needs transformers"):
        merge(model)
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())


def test_import_lowrank_ext_does_not_import_transformers():
    code = (
        "import sys, torch, lowrank_ext\n"
        "model = lowrank_ext.convert(torch.nn.Sequential(torch.nn.Linear(4, 4), "
        "torch.nn.Linear(4, 2)), allow_larger=True)\n"
        "lowrank_ext.merge(model); lowrank_ext.spectral.analyze(model)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.strip() == "[]"


def test_a_model_pickled_before_dense_kind_merges_to_nn_linear():
    # tests/data/v0_1_model.pt was pickled before the attribute existed: the class default holds.
    model = torch.load(Path(__file__).parent / "data" / "v0_1_model.pt", weights_only=False)
    layer = model["linear"]
    assert "dense_kind" not in vars(layer) and layer.dense_kind == "linear"
    x = torch.randn(4, layer.in_features, dtype=layer.U.dtype)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be one of"):
        layer.dense_kind = "conv2d"
        layer.to_dense()


def test_conversion_summary_names_conv1d():
    model = convert(gpt2(), rank=4)
    rows = {row.name: row for row in conversion_summary(model).modules}
    assert rows["transformer.h.0.attn.c_attn"].dense_class == "Conv1D"
    # (in, out) = (32, 96): dense 32·96 + 96 bias; rank 4: 4·(32 + 96) + 4 + 96 bias
    assert rows["transformer.h.0.attn.c_attn"].parameters_before == 32 * 96 + 96
    assert rows["transformer.h.0.attn.c_attn"].parameters_after == 4 * (32 + 96) + 4 + 96
    assert "lm_head" not in rows  # the output layer stays dense
