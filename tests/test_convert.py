"""Whole-model conversion (PEFT-style matching) and merge back to dense modules."""

import copy

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear
from lowrank_ext.nn import LowRankConv2d, LowRankMultiheadAttention, convert, merge, ranks

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(x)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.block = Block()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.fc(x))))


def _mlp():
    torch.manual_seed(0)
    return MLP().double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding="valid", padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, groups=4, padding=1),  # depthwise-like: kept dense under None
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    ).double()


def _transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
    with torch.no_grad():
        layer.self_attn.in_proj_bias.normal_()  # PyTorch initializes it to 0
    return nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=True),
        nn.Linear(8, 5, dtype=F64),
    )


def _equal_before_and_after(model, x, **convert_args):
    reference = copy.deepcopy(model)
    convert(model, allow_larger=True, **convert_args)
    torch.testing.assert_close(model(x), reference(x), **TOL)
    converted = copy.deepcopy(model)
    merge(model)
    torch.testing.assert_close(model(x), converted(x), **TOL)
    return converted


def test_mlp_round_trip_at_full_rank():
    model = _mlp()
    converted = _equal_before_and_after(model, torch.randn(7, 5, dtype=F64))
    assert ranks(converted) == {"fc": 5, "block.fc": 6, "block.fc2": 6}
    assert type(converted.head) is nn.Linear  # the output layer stays dense
    assert all(type(m) is nn.Linear for m in (model.fc, model.block.fc, model.head))
    assert ranks(model) == {}


@pytest.mark.parametrize("core", ["diag", "full"])
def test_cnn_round_trip_at_full_rank(core):
    model = _cnn()
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    converted = _equal_before_and_after(model, x, core=core)
    assert ranks(converted) == {"0": 8, "2": 8, "7": 10}
    assert isinstance(converted[2], LowRankConv2d) and converted[2].padding_mode == "reflect"
    assert type(converted[3]) is nn.Conv2d and type(converted[9]) is nn.Linear
    assert type(model[0]) is nn.Conv2d and model[2].padding == "valid"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_round_trip_in_train_and_eval_mode():
    model = _transformer()
    reference = copy.deepcopy(model)
    convert(model, target_modules="all-linear", core="full", allow_larger=True)
    encoder = model[0]
    assert isinstance(encoder.layers[0].self_attn, LowRankMultiheadAttention)
    assert isinstance(encoder.layers[1].linear2, LowRankLinear) and type(model[1]) is nn.Linear
    assert not encoder.use_nested_tensor
    assert ranks(model)["0.layers.1.self_attn.in_proj"] == 8
    x = torch.randn(3, 5, 8, dtype=F64)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    torch.testing.assert_close(model(x), reference(x), **TOL)
    model.eval()
    reference.eval()
    with torch.no_grad():
        # The dense encoder's nested-tensor path zeroes padded positions; compare the others.
        kept = ~padding
        expected = reference[0](x, src_key_padding_mask=padding)[kept]
        torch.testing.assert_close(model[0](x, src_key_padding_mask=padding)[kept], expected, **TOL)
        torch.testing.assert_close(model(x), reference(x), **TOL)
    low_rank = model(x)
    merge(model)
    assert type(model[0].layers[0].self_attn) is nn.MultiheadAttention
    assert not model.training
    torch.testing.assert_close(model(x), low_rank, **TOL)


def test_truncated_conversion_is_the_best_approximation_per_layer():
    model = _mlp()
    dense = copy.deepcopy(model)
    convert(model, rank=2, target_modules=["fc", "head"], allow_larger=True)
    assert ranks(model) == {"fc": 2, "block.fc": 2, "head": 2}
    for name in ranks(model):
        weight = dense.get_submodule(name).weight.detach()
        sigma = torch.linalg.svdvals(weight)
        error = torch.linalg.matrix_norm(model.get_submodule(name).weight - weight) ** 2
        assert error.item() == pytest.approx((sigma[2:] ** 2).sum().item(), rel=1e-10)


def test_energy_and_rank_pattern_choose_ranks_per_module():
    model = _mlp()
    powers = {
        name: torch.linalg.svdvals(model.get_submodule(name).weight.detach()) ** 2
        for name in ("fc", "block.fc", "block.fc2")
    }
    convert(model, energy=0.7, rank_pattern={"block\\.fc": 1, "fc": 3}, allow_larger=True)
    expected_energy = (
        int((torch.cumsum(powers["block.fc2"], 0) / powers["block.fc2"].sum() < 0.7).sum()) + 1
    )
    # "block\.fc" (first key) wins for block.fc; "fc" then matches the top-level fc only.
    assert ranks(model) == {"fc": 3, "block.fc": 1, "block.fc2": expected_energy}


def test_target_forms_follow_peft():
    # Suffix list: equal to the entry or ending in "." + entry, never a partial word.
    model = convert(_mlp(), target_modules=["fc"], allow_larger=True)
    assert set(ranks(model)) == {"fc", "block.fc"}
    # A string is a full-match regex.
    model = convert(_mlp(), target_modules=r"block\.fc\d?", allow_larger=True)
    assert set(ranks(model)) == {"block.fc", "block.fc2"}
    with pytest.raises(ValueError, match=r"the regex 'bloc' matches no module name in full"):
        convert(_mlp(), target_modules="bloc")
    # all-linear: every Linear but the last registered one, which can be named explicitly.
    assert set(ranks(convert(_mlp(), target_modules="all-linear", allow_larger=True))) == {
        "fc",
        "block.fc",
        "block.fc2",
    }
    assert set(ranks(convert(_mlp(), target_modules=["head"], allow_larger=True))) == {"head"}
    cnn = convert(_cnn(), target_modules="all-linear", allow_larger=True)
    assert set(ranks(cnn)) == {"7"}
    # Exclusions, as a list of suffixes or a regex.
    model = convert(_mlp(), target_modules="all-linear", exclude_modules=["fc2"], allow_larger=True)
    assert set(ranks(model)) == {"fc", "block.fc"}
    model = convert(_mlp(), exclude_modules=r"block\..*", allow_larger=True)
    assert set(ranks(model)) == {"fc"}


def test_output_layer_is_the_models_output_embeddings_when_it_has_them():
    class LanguageModel(MLP):
        def get_output_embeddings(self):
            return self.block.fc

    torch.manual_seed(0)
    model = convert(LanguageModel(), target_modules="all-linear", allow_larger=True)
    assert set(ranks(model)) == {"fc", "block.fc2", "head"}


def test_shared_module_is_replaced_everywhere_and_flags_carry_over():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 4), nn.Linear(4, 2))
    model[3].requires_grad_(False)
    model.eval()
    convert(model, allow_larger=True)
    assert model[0] is model[2] and isinstance(model[0], LowRankLinear)
    assert not model[0].training
    assert not any(p.requires_grad for p in model[3].parameters())
    assert all(p.requires_grad for p in model[0].parameters())
    merge(model)
    assert model[0] is model[2] and type(model[0]) is nn.Linear
    assert not model[3].weight.requires_grad and model[0].weight.requires_grad


def test_merge_after_training_the_full_core_matches_the_low_rank_function():
    model = _mlp()
    convert(model, rank=2, core="full")
    for layer in ranks(model):
        model.get_submodule(layer).U.requires_grad_(False)
        model.get_submodule(layer).V.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 5, dtype=F64)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    low_rank = model(x)
    merge(model)
    torch.testing.assert_close(model(x), low_rank, **TOL)
    assert torch.linalg.matrix_rank(model.block.fc.weight).item() == 2


def _state(model):
    return [(name, type(m), copy.deepcopy(m.state_dict())) for name, m in model.named_modules()]


def _assert_same_state(model, before):
    after = _state(model)
    assert [(n, t) for n, t, _ in after] == [(n, t) for n, t, _ in before]
    for (_, _, a), (_, _, b) in zip(after, before):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=2, energy=0.5), ValueError, "at most one of the arguments 'rank' and 'energy'"),
        (dict(rank=6), ValueError, r"cannot convert 'fc' \(Linear\): argument 'rank' .* \[1, 5\]"),
        (dict(target_modules=["fc", "fc3"]), ValueError, r"'fc3' matches no module"),
        (dict(exclude_modules=["fc9"]), ValueError, r"'exclude_modules': 'fc9' matches no module"),
        (dict(exclude_modules="all-linear"), ValueError, "not 'all-linear'"),
        (dict(target_modules=["block"]), ValueError, "target 'block' is a Block; convert handles"),
        (dict(exclude_modules=["fc", "fc2"]), ValueError, "no module to convert in MLP"),
        (dict(rank_pattern={"fc7": 2}), ValueError, r"\['fc7'\] match no module being converted"),
        (dict(rank_pattern={"fc": 0}), ValueError, "the rank for 'fc' must be a positive int"),
        (dict(rank_pattern={"fc(": 2}), ValueError, "'fc\\(' is not a valid regex"),
        (dict(target_modules="fc("), ValueError, "'fc\\(' is not a valid regex"),
        (dict(target_modules=3), TypeError, "must be a regex string or a list of names, got int"),
        (dict(core="dense"), ValueError, "argument 'core' must be one of"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, error, match):
    model = _mlp()
    before = _state(model)
    with pytest.raises(error, match=match):
        convert(model, **kwargs)
    _assert_same_state(model, before)


@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_a_model_whose_only_linear_is_the_output_layer_is_told_so(target_modules):
    # The default targets leave the output layer dense: with no other layer there is nothing
    # to convert, and the error names the layer and how to convert it anyway.
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    before = _state(model)
    with pytest.raises(ValueError, match="'0' is the output layer, kept dense unless named"):
        convert(model, rank=2, target_modules=target_modules)
    _assert_same_state(model, before)
    convert(model, rank=2, target_modules=["0"])
    assert ranks(model) == {"0": 2}


def test_a_late_failure_leaves_every_earlier_module_dense():
    # fc and block.fc are factorized before block.fc2 (6 × 6) fails at rank 7.
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError, match=r"cannot convert 'block.fc2' \(Linear\)"):
        convert(
            model,
            target_modules=["fc", "fc2"],
            rank_pattern={"block.fc2": 7},
            allow_larger=True,
        )
    _assert_same_state(model, before)


def test_attention_parts_and_unsupported_modules_give_clear_errors():
    model = nn.Sequential(
        nn.MultiheadAttention(8, 2), nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(2, 2, 1)
    )
    with pytest.raises(
        ValueError, match="target '0.out_proj' is part of the nn.MultiheadAttention '0'"
    ):
        convert(model, target_modules=["out_proj"])
    with pytest.raises(ValueError, match="target '1' is an nn.Conv2d with groups=2"):
        convert(model, target_modules=["1"])
    with pytest.raises(ValueError, match="target '2' is a Conv1d"):
        convert(model, target_modules="2")
    with pytest.raises(
        ValueError, match=r"cannot convert '0' .*in_proj \(8 → 24\): argument 'rank'"
    ):
        convert(model, target_modules=["0"], rank=9)
    assert type(model[0]) is nn.MultiheadAttention
    with pytest.raises(TypeError, match="argument 'model' must be an nn.Module"):
        convert("model")
    with pytest.raises(ValueError, match="is itself a LowRankLinear"):
        merge(LowRankLinear(3, 3, 1))


def test_converted_models_trace_without_graph_breaks():
    # backend="eager": dynamo's tracing (where graph breaks arise) without inductor's compile time.
    cnn = convert(_cnn(), allow_larger=True)
    x = torch.randn(2, 3, 12, 12, dtype=F64)
    torch.testing.assert_close(torch.compile(cnn, fullgraph=True, backend="eager")(x), cnn(x))
    transformer = convert(_transformer(), target_modules="all-linear", allow_larger=True)
    tokens = torch.randn(2, 5, 8, dtype=F64)
    compiled = torch.compile(transformer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(tokens), transformer(tokens))


def test_transformer_decoder_hosts_converted_self_and_cross_attention():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
    with torch.no_grad():
        layer.multihead_attn.in_proj_bias.normal_()  # PyTorch initializes it to 0
    decoder = nn.TransformerDecoder(layer, 2)
    reference = copy.deepcopy(decoder)
    convert(decoder, target_modules=["self_attn", "multihead_attn"], allow_larger=True)
    assert set(ranks(decoder)) == {
        f"layers.{i}.{attention}.{projection}"
        for i in (0, 1)
        for attention in ("self_attn", "multihead_attn")
        for projection in ("in_proj", "out_proj")
    }
    target, memory = torch.randn(2, 4, 8, dtype=F64), torch.randn(2, 6, 8, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(4, dtype=F64)
    for mode in ("train", "eval"):
        expected = getattr(reference, mode)()(target, memory, tgt_mask=causal, tgt_is_causal=True)
        output = getattr(decoder, mode)()(target, memory, tgt_mask=causal, tgt_is_causal=True)
        torch.testing.assert_close(output, expected, **TOL)
