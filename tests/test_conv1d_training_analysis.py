"""GPT-2's Conv1D projections under OIALR, spectral.analyze and `lowrank-ext analyze`."""

import json

import pytest
import torch
from tiny_gpt2 import CONV1D_NAMES, SHAPES, conv1d_names, gpt2, logits, tokens
from torch import nn

from lowrank_ext import OIALR, LowRankLinear, cli, convert, merge, spectral

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: no thread-pool wake-ups

TOL = dict(rtol=1e-10, atol=1e-10)
PLANTED = "transformer.h.0.mlp.c_fc"


def _lm_step(model, optimizer, ids) -> float:
    optimizer.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _expected_rank(S, cutoff, max_drop):
    """OIALR's documented rule: keep σ ≥ cutoff·σ_max, drop at most max_drop of the rank."""
    sigma = torch.linalg.svdvals(S.detach().double())
    rank = sigma.numel()
    return max(int((sigma >= cutoff * sigma[0]).sum()), rank - int(max_drop * rank))


def test_oialr_trains_gpt2_conv1d_projections():
    model, ids = gpt2(), tokens(batch=4, length=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=3, frequency=2, cutoff=0.5)
    losses = [_lm_step(model, optimizer, ids) for _ in range(2) if not oialr.step()]
    assert len(losses) == 2 and not oialr.converted

    losses.append(_lm_step(model, optimizer, ids))
    weights = {name: model.get_submodule(name).weight for name in CONV1D_NAMES}
    moments = {
        name: {k: optimizer.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq")}
        for name, w in weights.items()
    }
    before = logits(model, ids)
    assert oialr.step() is True
    assert oialr.ranks() == {name: min(SHAPES[name.split(".", 3)[3]]) for name in CONV1D_NAMES}
    torch.testing.assert_close(logits(model, ids), before, **TOL)
    assert type(model.lm_head) is nn.Linear  # the output layer stays dense, still tied
    assert model.lm_head.weight is model.transformer.wte.weight
    for name in CONV1D_NAMES:
        layer, old = model.get_submodule(name), moments[name]
        assert isinstance(layer, LowRankLinear) and layer.core == "full"
        assert layer.dense_kind == "conv1d"
        # A Conv1D's moments are stored (in, out): those of W (out, in) are their transposes.
        U, V, state = layer.U.detach(), layer.V.detach(), optimizer.state[layer.S]
        torch.testing.assert_close(state["exp_avg"], U.T @ old["exp_avg"].T @ V, **TOL)
        torch.testing.assert_close(
            state["exp_avg_sq"], (U * U).T @ old["exp_avg_sq"].T @ (V * V), **TOL
        )
        if name.endswith("attn.c_proj"):  # square: the untransposed product is wrong, not absent
            assert not torch.allclose(state["exp_avg"], U.T @ old["exp_avg"] @ V, atol=1e-8)

    dropped = False
    for step in range(4, 12):  # OIALR's step count; updates at 5, 7, 9, 11
        losses.append(_lm_step(model, optimizer, ids))
        previous = oialr.ranks()
        if (step - 3) % 2:
            expected = previous
        else:
            expected = {n: _expected_rank(m.S, 0.5, 0.5) for n, m in oialr._managed.items()}
        oialr.step()
        assert oialr.ranks() == expected
        dropped |= expected != previous
    assert dropped and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    low_rank = logits(model, ids)
    merge(model)
    assert conv1d_names(model) == CONV1D_NAMES
    torch.testing.assert_close(logits(model, ids), low_rank, **TOL)


def _planted_gpt2(dtype=torch.float64):
    """The tiny GPT-2 with PLANTED's (in, out) = (32, 128) weight of rank 5."""
    model = gpt2(dtype)
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(32, 5, generator=generator, dtype=torch.float64)
    right = torch.randn(5, 128, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        model.get_submodule(PLANTED).weight.copy_(0.02 * left @ right)
    return model


def test_spectral_analyze_reads_conv1d_as_its_out_by_in_matrix():
    model = _planted_gpt2()
    rows = {row.name: row for row in spectral.analyze(model)}
    for name in CONV1D_NAMES:
        weight = model.get_submodule(name).weight.detach()
        row = rows[name]
        assert row.kind == "Conv1D" and row.shape == (weight.shape[1], weight.shape[0])
        torch.testing.assert_close(
            row.singular_values, torch.linalg.svdvals(weight), rtol=1e-12, atol=1e-14
        )
    assert rows["transformer.h.0.attn.c_attn"].shape == (96, 32)
    assert rows[PLANTED].hard_rank == 5 and rows[PLANTED].collapsed
    assert rows["transformer.h.1.mlp.c_fc"].hard_rank == 32
    assert not rows["transformer.h.1.mlp.c_fc"].collapsed

    # Converted at rank 4: factored rows of the same (out, in) matrices, the leading σ kept.
    dense = {name: model.get_submodule(name).weight.detach() for name in CONV1D_NAMES}
    rows = {row.name: row for row in spectral.analyze(convert(model, rank=4))}
    for name, weight in dense.items():
        row = rows[name]
        assert row.kind == "LowRankLinear" and row.factored and row.full_rank == 4
        assert row.shape == (weight.shape[1], weight.shape[0])
        sigma = torch.linalg.svdvals(weight)
        expected = torch.cat([sigma[:4], sigma.new_zeros(sigma.numel() - 4)])
        torch.testing.assert_close(row.singular_values, expected, rtol=1e-10, atol=1e-12)


def _cli_layers(path, capsys) -> dict:
    code = cli.main(["analyze", str(path), "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return {layer["name"]: layer for layer in json.loads(captured.out)["layers"]}


def _check_state_dict_rows(layers, model):
    """A state dict's Conv1D weights are read as stored, (in, out); the spectrum is W's."""
    for name in CONV1D_NAMES:
        weight = model.get_submodule(name).weight.detach().double()
        sigma = torch.linalg.svdvals(weight)
        layer = layers[name]
        assert layer["shape"] == list(weight.shape) and layer["kind"] == "matrix"
        assert layer["sigma_max"] == pytest.approx(sigma[0].item(), rel=1e-6)
        assert layer["sigma_min"] == pytest.approx(sigma[-1].item(), rel=1e-5, abs=1e-9)
        assert layer["frobenius_norm"] == pytest.approx(sigma.norm().item(), rel=1e-6)
    assert layers[PLANTED]["hard_rank"] == 5 and layers[PLANTED]["collapsed"]
    assert layers["transformer.h.1.attn.c_attn"]["hard_rank"] == 32


def test_cli_analyze_on_saved_gpt2_checkpoints(tmp_path, capsys):
    model = _planted_gpt2(torch.float32)
    torch.save(model.state_dict(), tmp_path / "gpt2.pt")
    _check_state_dict_rows(_cli_layers(tmp_path / "gpt2.pt", capsys), model)

    model.save_pretrained(tmp_path / "hf")  # safetensors; the tied lm_head is saved once
    layers = _cli_layers(tmp_path / "hf" / "model.safetensors", capsys)
    _check_state_dict_rows(layers, model)

    dense = {name: model.get_submodule(name).weight.detach().double() for name in CONV1D_NAMES}
    torch.save(convert(model, rank=4).state_dict(), tmp_path / "low_rank.pt")
    layers = _cli_layers(tmp_path / "low_rank.pt", capsys)
    for name, weight in dense.items():  # factored: U (out, r), V (in, r), so out×in
        layer = layers[name]
        assert layer["factored"] and layer["full_rank"] == 4
        assert layer["shape"] == [weight.shape[1], weight.shape[0]]
        sigma = torch.linalg.svdvals(weight)
        assert layer["sigma_max"] == pytest.approx(sigma[0].item(), rel=1e-5)
    assert layers[PLANTED]["hard_rank"] == 4
