"""lowrank_ext.save_pretrained / from_pretrained: a converted model, in any state, comes back into
a freshly built base model with the same structure and the same outputs, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowrank_ext
from lowrank_ext import LowRankLinear, LowRankMultiheadAttention
from lowrank_ext.nn import FactoredModule

pytestmark = pytest.mark.usefixtures("one_thread")


def _structure(model: nn.Module) -> dict:
    """Every module's class and every low-rank layer's layout, by name."""
    return {
        name: (type(module).__name__,)
        + (
            (module.core, module.rank, module.frozen_rank, module.S_frozen is not None)
            if isinstance(module, FactoredModule)
            else ()
        )
        for name, module in model.named_modules()
    }


def _assert_same_state(loaded: nn.Module, saved: nn.Module) -> None:
    a, b = loaded.state_dict(), saved.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


class Mixed(nn.Module):
    """Every low-rank class and state: plain, core "full", grown, frozen, conv, attention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grown_conv = nn.Conv2d(4, 4, (1, 3), stride=2, padding="valid", bias=False)
        self.plain = nn.Linear(8, 12)
        self.full = nn.Linear(12, 12)
        self.grown = nn.Linear(12, 12)
        self.frozen = nn.Linear(12, 6)
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(6, 3, kdim=5, vdim=7, add_bias_kv=True)
        self.head = nn.Linear(6, 2)

    def forward(self, image, tokens, keys, values):
        h = self.grown_conv(self.conv(image)).mean(dim=(2, 3))  # (N, 4)
        t = self.frozen(self.grown(self.full(self.plain(tokens))))  # (N, L, 6)
        t = t + self.attention(t, t, t, need_weights=False)[0]
        c = self.cross(t.transpose(0, 1), keys, values, need_weights=False)[0].transpose(0, 1)
        return self.head(c).sum() + h.sum(), self.head(c)


def _mixed() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    lowrank_ext.convert(model, rank=3, target_modules=["full"], core="full")
    lowrank_ext.convert(
        model,
        rank=2,
        target_modules=["conv", "grown_conv", "plain", "grown", "frozen", "attention", "cross"],
        rank_pattern={"cross": 3},
        allow_larger=True,  # small test sizes: some layouts are past break-even
    )
    model.grown.grow(2, scale_init=0.5)
    model.grown_conv.grow(1, freeze_scales=True, scale_init=0.25)
    model.frozen.grow(1, scale_init=-0.3)
    model.frozen.freeze(freeze_scales=True)
    model.attention.out_proj.grow(1, scale_init=0.1)
    return model


def _mixed_inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 3, 5, 6, generator=g),
        torch.randn(2, 4, 8, generator=g),
        torch.randn(3, 2, 5, generator=g),
        torch.randn(3, 2, 7, generator=g),
    )


def test_every_low_rank_class_and_state_round_trips(tmp_path):
    model = _mixed().eval()
    inputs = _mixed_inputs()
    with torch.no_grad():
        expected = model(*inputs)[1]
    lowrank_ext.save_pretrained(model, tmp_path / "nested" / "checkpoint")  # created
    fresh = Mixed().eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(*inputs)[1], expected)  # loading must change it
    assert lowrank_ext.from_pretrained(fresh, tmp_path / "nested" / "checkpoint") is fresh
    assert _structure(fresh) == _structure(model)
    assert isinstance(fresh.cross, LowRankMultiheadAttention) and fresh.cross.ranks == {
        "q_proj": 3,
        "k_proj": 3,
        "v_proj": 3,
        "out_proj": 3,
    }
    assert fresh.frozen.U is None and fresh.frozen.S is None and fresh.frozen.rank == 3
    _assert_same_state(fresh, model)
    with torch.no_grad():
        assert torch.equal(fresh(*inputs)[1], expected)
    # Trainable as the saved model: gradients reach the same parameters.
    assert [n for n, p in fresh.named_parameters()] == [n for n, p in model.named_parameters()]


def test_the_config_records_class_replaced_class_sizes_and_layout(tmp_path):
    lowrank_ext.save_pretrained(_mixed(), tmp_path)
    config = json.loads((tmp_path / "lowrank_config.json").read_text())
    assert (config["library"], config["library_version"], config["format_version"]) == (
        "lowrank_ext",
        lowrank_ext.__version__,
        1,
    )
    modules = config["modules"]
    assert list(modules) == [
        "conv",
        "grown_conv",
        "plain",
        "full",
        "grown",
        "frozen",
        "attention",
        "cross",
    ]
    assert modules["grown"] == {
        "class": "LowRankLinear",
        "replaces": "torch.nn.modules.linear.Linear",
        "in_features": 12,
        "out_features": 12,
        "bias": True,
        "layout": {"core": "diag", "rank": 4, "frozen_rank": 2, "frozen_scales": False},
    }
    assert modules["full"]["layout"] == {
        "core": "full",
        "rank": 3,
        "frozen_rank": 0,
        "frozen_scales": False,
    }
    assert modules["frozen"]["layout"]["frozen_scales"] is True
    assert modules["grown_conv"] == {
        "class": "LowRankConv2d",
        "replaces": "torch.nn.modules.conv.Conv2d",
        "in_channels": 4,
        "out_channels": 4,
        "kernel_size": [1, 3],
        "stride": [2, 2],
        "padding": "valid",
        "dilation": [1, 1],
        "padding_mode": "zeros",
        "bias": False,
        "layout": {"core": "diag", "rank": 3, "frozen_rank": 2, "frozen_scales": True},
    }
    cross = modules["cross"]
    assert cross["replaces"] == "torch.nn.modules.activation.MultiheadAttention"
    assert (cross["kdim"], cross["vdim"], cross["add_bias_kv"]) == (5, 7, True)
    assert list(cross["projections"]) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert cross["projections"]["k_proj"]["in_features"] == 5
    assert modules["attention"]["projections"]["out_proj"]["layout"]["frozen_rank"] == 2


def test_tied_and_shared_tensors_are_saved_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.first = nn.Linear(8, 8)
            self.second = self.first  # one module under two names
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight  # tied, as a language model's head

        def forward(self, ids):
            return self.head(self.second(self.first(self.embed(ids))))

    torch.manual_seed(0)
    model = lowrank_ext.convert(Tied(), rank=3, target_modules=["first"])
    assert model.second is model.first
    ids = torch.tensor([[1, 4, 9], [0, 2, 2]])
    lowrank_ext.save_pretrained(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as archive:
        keys = set(archive.keys())
    # Each shared tensor once, under one of its names.
    assert len(keys & {"embed.weight", "head.weight"}) == 1
    assert len(keys & {"first.U", "second.U"}) == 1
    assert len(keys) == 5  # embedding (= head) and U, S, V, bias
    config = json.loads((tmp_path / "lowrank_config.json").read_text())
    assert list(config["modules"]) == ["first"]
    fresh = lowrank_ext.from_pretrained(Tied(), tmp_path)
    assert isinstance(fresh.first, LowRankLinear) and fresh.second is fresh.first
    assert fresh.head.weight is fresh.embed.weight
    _assert_same_state(fresh, model)
    assert torch.equal(fresh(ids), model(ids))


def test_gpt2_conv1d_round_trip(tmp_path):
    """GPT-2's Conv1D projections (weight (in, out)): convert, save, rebuild, merge to Conv1D."""
    from tiny_gpt2 import gpt2, logits, tokens
    from transformers.pytorch_utils import Conv1D

    model = lowrank_ext.convert(gpt2(torch.float32), rank=4)
    ids = tokens()
    lowrank_ext.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "lowrank_config.json").read_text())
    record = config["modules"]["transformer.h.0.attn.c_attn"]
    assert record["replaces"] == "transformers.pytorch_utils.Conv1D"
    assert (record["in_features"], record["out_features"]) == (32, 96)
    assert config["modules"]["transformer.h.0.attn.c_attn"]["layout"]["rank"] == 4
    fresh = lowrank_ext.from_pretrained(gpt2(torch.float32, seed=5), tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    layer = fresh.get_submodule("transformer.h.1.mlp.c_fc")
    assert isinstance(layer, LowRankLinear) and layer.dense_kind == "conv1d"
    lowrank_ext.merge(fresh)
    assert isinstance(fresh.get_submodule("transformer.h.1.mlp.c_fc"), Conv1D)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    # a base model whose module there is an nn.Linear does not fit the record
    other = gpt2(torch.float32)
    other.transformer.h[0].attn.c_attn = nn.Linear(32, 96)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn.*torch\.nn"):
        lowrank_ext.from_pretrained(other, tmp_path)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_oialr_model_round_trips(tmp_path):
    def mlp():
        return nn.Sequential(
            nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )

    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    oialr = lowrank_ext.OIALR(model, optimizer, delay=0, frequency=1, cutoff=0.4)
    x = torch.randn(32, 6)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        oialr.step()
    ranks = lowrank_ext.ranks(model)
    assert ranks["0"] < 6 and ranks["2"] < 16  # truncated during training
    lowrank_ext.save_pretrained(model, tmp_path)
    fresh = lowrank_ext.from_pretrained(mlp(), tmp_path)
    assert lowrank_ext.ranks(fresh) == ranks and fresh[2].core == "full"
    assert torch.equal(fresh(x), model(x))


def test_devices_dtypes_and_training_flags_come_from_the_base_model(tmp_path):
    torch.manual_seed(0)
    model = lowrank_ext.convert(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)), rank=2).double()
    lowrank_ext.save_pretrained(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double().eval()
    fresh[0].requires_grad_(False)
    lowrank_ext.from_pretrained(fresh, tmp_path)
    assert fresh[0].U.dtype == torch.float64 and not fresh[0].training
    assert not any(p.requires_grad for p in fresh[0].parameters())
    # A float32 base model takes the float64 weights in float32, as load_state_dict does.
    single = lowrank_ext.from_pretrained(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)), tmp_path)
    assert single[0].U.dtype == torch.float32
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(single(x.float()).double(), model(x), rtol=1e-6, atol=1e-6)


def test_saving_again_overwrites_the_files(tmp_path):
    torch.manual_seed(0)
    model = lowrank_ext.convert(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)), rank=2)
    lowrank_ext.save_pretrained(model, tmp_path)
    model[0].grow(1)
    lowrank_ext.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lowrank_config.json",
        "model.safetensors",
    ]
    fresh = lowrank_ext.from_pretrained(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)), tmp_path)
    assert (fresh[0].rank, fresh[0].frozen_rank) == (3, 2)
    x = torch.randn(4, 5)
    assert torch.equal(fresh(x), model(x))


def test_exported_from_the_package():
    assert lowrank_ext.save_pretrained is lowrank_ext.io.save_pretrained
    assert lowrank_ext.from_pretrained is lowrank_ext.io.from_pretrained
    assert {"save_pretrained", "from_pretrained"} <= set(lowrank_ext.__all__)
