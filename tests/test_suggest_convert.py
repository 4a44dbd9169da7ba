"""spectral.suggest_ranks → convert (issue 17, item 7): `convert(model,
rank_pattern=spectral.suggest_ranks(model))` converts exactly the modules convert targets, each
at its suggested rank, for a plain MLP, a GPT-2 and a BERT built from their configs, and models
with nn.MultiheadAttention. Every suggested rank is checked against the energy rule applied to
float64 torch.linalg.svdvals of the matrix convert factorizes."""

import math
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext import break_even_rank, spectral

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gpt2 import CONV1D_NAMES, gpt2  # noqa: E402

transformers = pytest.importorskip("transformers")


def energy_rank(matrix: torch.Tensor, energy: float) -> int:
    """The energy rule, written out: the smallest k with Σ_{i≤k} σᵢ² ≥ energy · Σσ²."""
    power = torch.linalg.svdvals(matrix.detach().double()) ** 2
    total, running = float(power.sum()), 0.0
    for k, value in enumerate(power.tolist(), start=1):
        running += value
        if running >= energy * total * (1 - 1e-12):
            return k
    return power.numel()


def planted(out_features, in_features, rank, seed, noise=1e-3) -> torch.Tensor:
    """A rank-`rank` matrix with σ = 1, 1/2, 1/3, … plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(in_features, rank, generator=generator))[0]
    sigma = 1.0 / torch.arange(1, rank + 1, dtype=torch.float32)
    noisy = torch.randn(out_features, in_features, generator=generator) * noise
    return left @ torch.diag(sigma) @ right.T + noisy


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(32, 48),
            act1=nn.ReLU(),
            fc2=nn.Linear(48, 48),
            act2=nn.ReLU(),
            conv_like=nn.Linear(48, 40),
            head=nn.Linear(40, 10),
        )
    )
    with torch.no_grad():
        for seed, (name, rank) in enumerate((("fc1", 3), ("fc2", 6), ("conv_like", 9))):
            getattr(model, name).weight.copy_(
                planted(*getattr(model, name).weight.shape, rank, seed)
            )
    return model


LAYERS = ("fc1", "fc2", "conv_like")  # mlp()'s layers convert targets (not the output layer)


def _applied(model) -> dict[str, int]:
    """{converted module: rank}, an attention module's rank as that of its projections (all
    the same when converted with one rank)."""
    applied = {}
    for name, rank in lowrank_ext.ranks(model).items():
        owner, _, part = name.rpartition(".")
        if part in ("in_proj", "q_proj", "k_proj", "v_proj", "out_proj") and isinstance(
            model.get_submodule(owner), lowrank_ext.LowRankMultiheadAttention
        ):
            assert applied.setdefault(owner, rank) == rank, name
        else:
            applied[name] = rank
    return applied


def _break_even(module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        weights = [module.out_proj.weight]
        weights += (
            [module.in_proj_weight]
            if module._qkv_same_embed_dim
            else [getattr(module, f"{p}_proj_weight") for p in "qkv"]
        )
        return min(break_even_rank(w.shape[1], w.shape[0]) for w in weights)
    weight = module.weight.reshape(module.weight.shape[0], -1)
    return break_even_rank(*weight.shape)


def convert_with_suggestion(model, energy, **selection):
    """suggest_ranks → convert; checks that each module got its rank or, above its break-even
    rank, stayed dense (with convert's warning). Returns (suggested, converted names)."""
    suggested = spectral.suggest_ranks(model, energy, **selection)
    break_even = {name: _break_even(model.get_submodule(name)) for name in suggested}
    larger = [name for name, rank in suggested.items() if rank > break_even[name]]
    if larger:
        with pytest.warns(UserWarning, match="kept .* dense"):
            lowrank_ext.convert(model, rank_pattern=suggested, **selection)
    else:
        lowrank_ext.convert(model, rank_pattern=suggested, **selection)
    applied = _applied(model)
    assert sorted(applied) == sorted(set(suggested) - set(larger))
    assert applied == {name: suggested[name] for name in applied}
    return suggested, list(applied)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_mlp(energy):
    model = mlp()
    weights = {name: model.get_submodule(name).weight.clone() for name in LAYERS}
    expected = {name: energy_rank(weight, energy) for name, weight in weights.items()}
    suggested, converted = convert_with_suggestion(model, energy)
    assert suggested == expected  # the output layer "head" is left out, as convert leaves it
    assert converted == list(LAYERS)
    assert 1 <= suggested["fc1"] <= 3 and suggested["fc2"] <= 6 and suggested["conv_like"] <= 9


def test_mlp_matches_convert_with_energy():
    """rank_pattern=suggest_ranks(model, e) converts as convert(model, energy=e) does."""
    by_pattern, by_energy = mlp(), mlp()
    expected = {name: energy_rank(by_energy.get_submodule(name).weight, 0.9) for name in LAYERS}
    lowrank_ext.convert(by_pattern, rank_pattern=spectral.suggest_ranks(by_pattern, 0.9))
    lowrank_ext.convert(by_energy, energy=0.9)
    assert lowrank_ext.ranks(by_pattern) == lowrank_ext.ranks(by_energy) == expected


def test_gpt2_from_config():
    model = gpt2()
    matrices = {name: model.get_submodule(name).weight.T.clone() for name in CONV1D_NAMES}
    suggested, converted = convert_with_suggestion(model, 0.5)
    # No wte, wpe (embeddings) or lm_head (the output layer): only the Conv1D projections.
    assert list(suggested) == CONV1D_NAMES
    assert suggested == {name: energy_rank(W, 0.5) for name, W in matrices.items()}
    assert converted, "energy 0.5 of a random init must fit some break-even ranks"


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_bert_from_config():
    model = tiny_bert()
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    matrices = {name: model.get_submodule(name).weight.clone() for name in linear}
    suggested, converted = convert_with_suggestion(model, 0.5)
    # BertModel has no output embeddings: its last linear layer (the pooler) is the output
    # layer convert leaves dense; the embeddings are not linear layers.
    assert list(suggested) == [name for name in linear if name != "pooler.dense"]
    assert suggested == {name: energy_rank(matrices[name], 0.5) for name in suggested}
    assert converted
    ids = torch.tensor([[2, 7, 31, 5, 0, 0]])
    with torch.no_grad():
        model(input_ids=ids)  # the converted model runs


def test_target_and_exclude_modules_as_convert_takes_them():
    model = tiny_bert()
    only = spectral.suggest_ranks(model, 0.5, target_modules=["query", "value"])
    assert sorted(only) == sorted(
        f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    )
    regex = spectral.suggest_ranks(model, 0.5, target_modules=r".*\.output\.dense")
    assert all(name.endswith("output.dense") for name in regex) and len(regex) == 4
    excluded = spectral.suggest_ranks(model, 0.5, exclude_modules=["intermediate.dense"])
    assert set(excluded) == set(spectral.suggest_ranks(model, 0.5)) - {
        f"encoder.layer.{i}.intermediate.dense" for i in range(2)
    }
    with_head = spectral.suggest_ranks(model, 0.5, target_modules="all-linear")
    assert "pooler.dense" not in with_head
    with pytest.raises(ValueError, match="'target_modules': 'nothing' matches no module"):
        spectral.suggest_ranks(model, target_modules=["nothing"])
    with pytest.raises(ValueError, match="target 'embeddings.word_embeddings' is a Embedding"):
        spectral.suggest_ranks(model, target_modules=["word_embeddings"])
    report = spectral.analyze(model)
    with pytest.raises(ValueError, match="'target_modules' and 'exclude_modules'.*pass the model"):
        spectral.suggest_ranks(report, target_modules=["query"])


class Attentive(nn.Module):
    """Self-attention with a packed in_proj, cross-attention with kdim = vdim = 12 ≠ E, a
    linear layer and the output layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(16, 2)
        self.cross = nn.MultiheadAttention(16, 2, kdim=12, vdim=12)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(planted(48, 16, 5, seed=1))
            self.attn.out_proj.weight.copy_(planted(16, 16, 3, seed=2))
            for seed, p in enumerate("qkv"):
                weight = getattr(self.cross, f"{p}_proj_weight")
                weight.copy_(planted(*weight.shape, 2 + seed, seed=10 + seed))
            self.cross.out_proj.weight.copy_(planted(16, 16, 2, seed=20))
            self.fc.weight.copy_(planted(16, 16, 4, seed=3))


def test_multihead_attention_gets_one_rank_over_its_projections():
    model = Attentive()
    energy = 0.99
    projections = {
        "attn": [model.attn.in_proj_weight, model.attn.out_proj.weight],
        "cross": [getattr(model.cross, f"{p}_proj_weight") for p in "qkv"]
        + [model.cross.out_proj.weight],
        "fc": [model.fc.weight],
    }
    expected = {
        name: max(energy_rank(W, energy) for W in weights) for name, weights in projections.items()
    }
    assert expected == {"attn": 5, "cross": 4, "fc": 4}  # the planted ranks, largest projection
    suggested, converted = convert_with_suggestion(model, energy)
    assert suggested == expected and converted == ["attn", "cross", "fc"]
    assert lowrank_ext.ranks(model) == {
        "attn.in_proj": 5,
        "attn.out_proj": 5,
        "cross.q_proj": 4,
        "cross.k_proj": 4,
        "cross.v_proj": 4,
        "cross.out_proj": 4,
        "fc": 4,
    }


def test_report_rows_of_an_attention_are_not_convert_keys():
    """The report's rows of an nn.MultiheadAttention (q/k/v_proj split from in_proj, out_proj)
    name matrices, not modules convert converts one by one: suggest_ranks(report) is refused
    by convert with a message pointing at suggest_ranks(model), whose key is the attention."""
    model = Attentive()
    report = spectral.analyze(model)
    assert [row.name for row in report][:4] == [
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.out_proj",
    ]
    with pytest.raises(
        ValueError, match=r"match no module being converted.*suggest_ranks\(model\)"
    ):
        lowrank_ext.convert(model, rank_pattern=spectral.suggest_ranks(report))
    assert isinstance(model.attn, nn.MultiheadAttention)  # refused: the model is unchanged
    # As targets: q/k/v_proj are no modules; out_proj is one, converted with its attention only.
    with pytest.raises(ValueError, match="'attn.q_proj' matches no module"):
        lowrank_ext.convert(model, rank=2, target_modules=["attn.q_proj"])
    with pytest.raises(ValueError, match="'attn.out_proj' is part of the nn.MultiheadAttention"):
        lowrank_ext.convert(model, rank=2, target_modules=["attn.out_proj"])
    assert list(spectral.suggest_ranks(model)) == ["attn", "cross", "fc"]


class Nested(nn.Module):
    """'head' is a suffix of 'encoder.head': a rank_pattern key "head" matches both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(24, 24)
        self.encoder = nn.Module()
        self.encoder.head = nn.Linear(24, 24)
        self.out = nn.Linear(24, 2)
        with torch.no_grad():
            self.head.weight.copy_(planted(24, 24, 2, seed=1))
            self.encoder.head.weight.copy_(planted(24, 24, 5, seed=2))


def test_a_full_name_key_is_that_module_s_whatever_the_order():
    model = Nested()
    suggested = spectral.suggest_ranks(model, 0.999)
    assert list(suggested) == ["head", "encoder.head"] and suggested == {
        "head": 2,
        "encoder.head": 5,
    }
    lowrank_ext.convert(model, rank_pattern=suggested)
    assert lowrank_ext.ranks(model) == {"head": 2, "encoder.head": 5}
    # A key that is no full name still matches by suffix, the first in the dict's order.
    other = Nested()
    lowrank_ext.convert(other, rank_pattern={"head": 3})
    assert lowrank_ext.ranks(other) == {"head": 3, "encoder.head": 3}


def test_the_model_is_left_as_it_was():
    model = mlp().train()
    model.fc2 = nn.utils.parametrizations.spectral_norm(model.fc2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    spectral.suggest_ranks(model)
    assert all(module.training for module in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # spectral_norm's power iteration too


def test_zero_and_non_finite_weights():
    model = mlp()
    with torch.no_grad():
        model.fc1.weight.zero_()
    assert spectral.suggest_ranks(model)["fc1"] == 1
    with torch.no_grad():
        model.fc2.weight[3, 4] = math.nan
    with pytest.raises(ValueError, match=r"layer 'fc2' has non-finite weights \(1 NaN"):
        spectral.suggest_ranks(model)


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="'energy'"):
        spectral.suggest_ranks(model, energy=1.5)
    with pytest.raises(TypeError, match="'obj' must be an nn.Module .* or a SpectralReport"):
        spectral.suggest_ranks({"fc1.weight": model.fc1.weight})
