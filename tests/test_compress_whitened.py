"""calibrate + convert(calibration=...): the statistics against a float64 reference, and the
whitened truncation's output error against its prediction and against plain truncation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_ext
from lowrank_ext.compress import WhitenedSVD, whitening_factor

IN, HIDDEN, OUT = 24, 20, 6


def inputs(rows=600, seed=0, decay=3.0):
    """Correlated inputs (a decaying spectrum), float64: where whitening matters."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN, IN, generator=g, dtype=torch.float64)
    mixing *= torch.logspace(0, -decay, IN, dtype=torch.float64)
    return torch.randn(rows, IN, generator=g, dtype=torch.float64) @ mixing.T


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()


def output_error(W, W_prime, X):
    return float(((W - W_prime) @ X.T).norm() ** 2)


def test_second_moments_match_float64_reference_for_every_batch_form():
    X = inputs()
    model = mlp()
    hidden = torch.tanh(model[0](X)).detach()

    class TwoArgs(nn.Module):  # tuple and keyword batches
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, scale=1.0):
            return self.inner(a * scale)

    for batches, wrapped in (
        ([X[:250], X[250:]], model),
        ([(X[:100],), (X[100:],)], TwoArgs(model)),
        ([{"a": X[:300]}, {"a": X[300:], "scale": 1.0}], TwoArgs(model)),
    ):
        stats = lowrank_ext.calibrate(wrapped, batches, target_modules=["0", "2"], progress=False)
        prefix = "inner." if wrapped is not model else ""
        first, second = stats.second_moments[prefix + "0"], stats.second_moments[prefix + "2"]
        torch.testing.assert_close(first, X.T @ X / len(X), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(second, hidden.T @ hidden / len(X), rtol=1e-12, atol=1e-14)
        assert stats.rows == {prefix + "0": 600, prefix + "2": 600}
        assert first.dtype == torch.float64


def test_sequence_inputs_flatten_rows_and_float32_accumulates_in_float64():
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(8, 4))
    X = torch.randn(3, 5, 8)  # (batch, tokens, features), float32
    stats = lowrank_ext.calibrate(layer, [X], target_modules=["0"], progress=False)
    flat = X.reshape(-1, 8).double()
    torch.testing.assert_close(stats.second_moments["0"], flat.T @ flat / 15, rtol=1e-12, atol=0)
    assert stats.rows == {"0": 15}


def test_calibrate_restores_flags_removes_hooks_and_changes_no_output():
    X = inputs()
    model = mlp().train()
    model[2].eval()
    expected = model(X).detach()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0", "2"], progress=False)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(model(X).detach(), expected)
    assert set(stats.second_moments) == {"0", "2"}


def test_whitened_error_equals_prediction_and_beats_plain_truncation():
    X = inputs()
    model = mlp()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0"], ridge=0.0, progress=False)
    W = model[0].weight.detach().clone()
    for rank in (2, 5, 9):
        whitened = lowrank_ext.convert(
            copy.deepcopy(model), rank=rank, target_modules=["0"], calibration=stats
        )
        plain = lowrank_ext.convert(copy.deepcopy(model), rank=rank, target_modules=["0"])
        got = output_error(W, whitened[0].weight.detach(), X)
        # Σ of the dropped σ² of W L, L the Cholesky factor of XᵀX/n, times n rows
        L = torch.linalg.cholesky(X.T @ X / len(X))
        sigma = torch.linalg.svdvals(W @ L)
        assert got == pytest.approx(float((sigma[rank:] ** 2).sum()) * len(X), rel=1e-8)
        plain_error = output_error(W, plain[0].weight.detach(), X)
        assert got < 0.5 * plain_error  # correlated inputs: far better, not just no worse
        U, S, V = whitened[0].U.detach(), whitened[0].S.detach(), whitened[0].V.detach()
        torch.testing.assert_close(U.T @ U, torch.eye(rank, dtype=U.dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(V.T @ V, torch.eye(rank, dtype=V.dtype), rtol=0, atol=1e-12)
        assert S.dim() == 1 and bool((S[:-1] >= S[1:]).all()) and bool((S > 0).all())
        torch.testing.assert_close(whitened[0].bias, model[0].bias)


def test_full_core_and_conversion_keep_the_same_weight():
    X = inputs()
    model = mlp()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0"], progress=False)
    diag = lowrank_ext.convert(
        copy.deepcopy(model), rank=4, target_modules=["0"], calibration=stats
    )
    full = lowrank_ext.convert(
        copy.deepcopy(model), rank=4, target_modules=["0"], calibration=stats, core="full"
    )
    assert full[0].S.shape == (4, 4)
    torch.testing.assert_close(full[0].weight, diag[0].weight, rtol=0, atol=1e-12)


def test_energy_is_measured_in_the_whitened_basis():
    X = inputs()
    model = mlp()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0"], progress=False)
    L, _ = whitening_factor(stats.second_moments["0"], stats.ridge)
    sigma = torch.linalg.svdvals(model[0].weight.detach() @ L)
    share = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    expected = int((share < 0.9).sum()) + 1
    converted = lowrank_ext.convert(
        copy.deepcopy(model), energy=0.9, target_modules=["0"], calibration=stats
    )
    assert converted[0].rank == expected
    plain_rank = lowrank_ext.nn.energy_rank(torch.linalg.svdvals(model[0].weight.detach()), 0.9)
    assert expected < plain_rank  # W X's energy is more concentrated than W's


def test_rank_deficient_inputs_are_regularized_and_never_worse_than_plain():
    # 10 rows for 24 inputs, and 4 dead inputs: C has rank 10
    X = inputs(rows=10)
    X[:, :4] = 0
    model = mlp()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0"], ridge=0.0, progress=False)
    L, ridge = whitening_factor(stats.second_moments["0"], 0.0)
    assert ridge > 0 and bool(torch.isfinite(L).all())  # grew from 0 until Cholesky succeeded
    W = model[0].weight.detach()
    for rank in (3, 6, 9):
        converted = lowrank_ext.convert(
            copy.deepcopy(model), rank=rank, target_modules=["0"], calibration=stats
        )
        plain = lowrank_ext.convert(copy.deepcopy(model), rank=rank, target_modules=["0"])
        whitened = output_error(W, converted[0].weight.detach(), X)
        assert whitened <= output_error(W, plain[0].weight.detach(), X) * (1 + 1e-9)
        assert bool(torch.isfinite(converted[0].weight).all())
    # rank 10 holds all of X's span: its output error on the calibration rows is (nearly) zero
    converted = lowrank_ext.convert(
        copy.deepcopy(model), rank=10, target_modules=["0"], calibration=stats
    )
    assert output_error(W, converted[0].weight.detach(), X) < 1e-12 * float((W @ X.T).norm() ** 2)


def test_falls_back_to_plain_where_whitened_is_worse(monkeypatch):
    X = inputs()
    model = mlp()
    stats = lowrank_ext.calibrate(model, [X], target_modules=["0"], progress=False)

    def worse(self, rank):  # a whitened result that misses the calibration data entirely
        U, s, V = self.plain_factors(rank)
        return U, s, torch.roll(V, 1, dims=0)

    monkeypatch.setattr(WhitenedSVD, "whitened_factors", worse)
    with pytest.warns(UserWarning, match=r"layer '0' at rank 3: the plain truncated SVD"):
        converted = lowrank_ext.convert(
            copy.deepcopy(model), rank=3, target_modules=["0"], calibration=stats
        )
    plain = lowrank_ext.convert(copy.deepcopy(model), rank=3, target_modules=["0"])
    torch.testing.assert_close(converted[0].weight, plain[0].weight, rtol=0, atol=1e-12)
    assert stats.fallbacks == {"0": [3]}


def test_gpt2_conv1d_layers_calibrate_and_convert():
    pytest.importorskip("transformers")
    from tiny_gpt2 import conv1d_names, gpt2, logits, tokens

    model = gpt2()
    ids = tokens(batch=4, length=16)
    names = conv1d_names(model)
    stats = lowrank_ext.calibrate(model, [ids[:2], ids[2:]], target_modules=names, progress=False)
    assert stats.rows == dict.fromkeys(names, 64)
    assert stats.second_moments["transformer.h.0.mlp.c_proj"].shape == (128, 128)
    reference = logits(model, ids)
    whitened = lowrank_ext.convert(copy.deepcopy(model), rank=8, target_modules=names,
                                   calibration=stats)  # fmt: skip
    plain = lowrank_ext.convert(copy.deepcopy(model), rank=8, target_modules=names)
    assert whitened.transformer.h[0].mlp.c_fc.dense_kind == "conv1d"
    error_whitened = float((logits(whitened, ids) - reference).norm())
    error_plain = float((logits(plain, ids) - reference).norm())
    assert error_whitened < error_plain
    merged = lowrank_ext.merge(copy.deepcopy(whitened))  # back to Conv1D, same function
    torch.testing.assert_close(logits(merged, ids), logits(whitened, ids), rtol=1e-9, atol=1e-9)


def test_gpt2_sensitivity_reads_the_logits_and_the_budget_uses_it():
    pytest.importorskip("transformers")
    from tiny_gpt2 import conv1d_names, gpt2, logits, tokens

    model = gpt2()
    ids = tokens(batch=4, length=16)
    names = conv1d_names(model)
    options = {"sensitivity": 0.5, "sensitivity_batches": 1, "progress": False}
    stats = lowrank_ext.calibrate(model, [ids[:2], ids[2:]], target_modules=names, **options)
    assert set(stats.sensitivity) == set(names) and all(v > 0 for v in stats.sensitivity.values())
    # the probe: layer alone at half its numbers, the logits' relative squared error per unit of
    # the layer's predicted error; recompute one by hand
    name = "transformer.h.1.mlp.c_fc"
    layer = model.get_submodule(name)
    source = stats.factorization(name, layer.weight.mT)
    rank = lowrank_ext.nn.calibrated.uniform_rank(32, 128, 0.5)
    U, s, V = source.whitened_factors(rank)
    reference = logits(model, ids[:2])
    handle = layer.register_forward_hook(lambda m, a, o: a[0] @ ((U * s) @ V.mT).mT + m.bias)
    try:
        error = float(((logits(model, ids[:2]) - reference) ** 2).sum() / (reference**2).sum())
    finally:
        handle.remove()
    assert stats.sensitivity[name] == pytest.approx(error / source.predicted_error(rank), rel=1e-6)
    compressed = lowrank_ext.convert(copy.deepcopy(model), budget=0.5, target_modules=names,
                                     calibration=stats)  # fmt: skip
    summary = lowrank_ext.conversion_summary(compressed)
    factored = sum(row.parameters_after for row in summary.modules if not row.kept_dense)
    assert 0 < factored and summary.parameters_after < summary.parameters_before


@pytest.mark.cuda
def test_calibrate_and_convert_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X = inputs()
    model = mlp()
    cpu = lowrank_ext.calibrate(model, [X], target_modules=["0"], progress=False)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = lowrank_ext.calibrate(gpu_model, [X.cuda()], target_modules=["0"], progress=False)
    assert gpu.second_moments["0"].is_cuda
    torch.testing.assert_close(gpu.second_moments["0"].cpu(), cpu.second_moments["0"])
    lowrank_ext.convert(gpu_model, rank=5, target_modules=["0"], calibration=gpu)
    reference = lowrank_ext.convert(model, rank=5, target_modules=["0"], calibration=cpu)
    torch.testing.assert_close(gpu_model[0].weight.cpu(), reference[0].weight, atol=1e-9, rtol=0)
