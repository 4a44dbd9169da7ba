"""lowrank_ext.spectral: ranks against planted truths, metrics against float64 references,
every layer kind (conv reshape vs an explicit unfold, attention, parametrized, factored),
the report formats, the figures and bad input."""

import csv
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lowrank_ext import LowRankLinear, break_even_rank, spectral
from lowrank_ext.nn import energy_rank

ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def planted(rows, cols, rank, dtype=torch.float64, *, low=1.0, high=2.0, seed=0):
    """An exactly rank-`rank` matrix (in float64) with singular values in [low, high], rounded
    to `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, rank, dtype=torch.float64, generator=generator))
    sigma = torch.linspace(high, low, rank, dtype=torch.float64)
    return ((left * sigma) @ right.T).to(dtype)


def svdvals64(matrix):
    return torch.linalg.svdvals(matrix.detach().double())


# --- ranks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 256, 32), (480, 160, 40), (96, 160, 95)])
def test_planted_rank_is_exact_in_every_dtype(dtype, shape):
    rows, cols, rank = shape
    row = spectral.analyze(planted(rows, cols, rank, dtype))[0]
    assert row.numerical_rank == rank
    assert row.hard_rank == rank
    assert row.dtype == str(dtype).removeprefix("torch.")
    # The rounding noise left in the zero singular values stays under the tolerance.
    noise = torch.cat([row.singular_values[rank:], torch.zeros(1, dtype=torch.float64)])
    assert float(noise.max()) < row.numerical_tol
    assert float(row.singular_values[rank - 1]) > row.numerical_tol


def test_float32_rank_is_not_judged_at_float64_tolerance():
    # The failure the module must avoid: float64's tolerance on a float32 matrix sees full rank.
    W = planted(256, 256, 32, torch.float32)
    assert np.linalg.matrix_rank(W.double().numpy()) == 256
    row = spectral.analyze(W)[0]
    assert row.numerical_rank == 32 and row.hard_rank == 32
    assert row.collapsed and row.collapsed_fraction == pytest.approx(1 - 32 / 256)


@settings(max_examples=25)
@given(
    rows=st.integers(2, 96),
    cols=st.integers(2, 96),
    data=st.data(),
    dtype=st.sampled_from(ALL_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_planted_rank_property(rows, cols, data, dtype, seed):
    rank = data.draw(st.integers(1, min(rows, cols)))
    row = spectral.analyze(planted(rows, cols, rank, dtype, seed=seed))[0]
    assert (row.numerical_rank, row.hard_rank) == (rank, rank)


def test_float64_numerical_rank_agrees_with_numpy():
    W = planted(200, 120, 40) + 1e-15 * torch.randn(200, 120, dtype=torch.float64)
    row = spectral.analyze(W)[0]
    assert row.numerical_rank == np.linalg.matrix_rank(W.numpy()) == 40
    assert row.numerical_tol == pytest.approx(row.sigma_max * 200 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relative_verdict_does_not_change_with_scale_absolute_one_does(dtype):
    # σ from 1 down to 1e-6: some above, some below rtol = 1e-3 of σ_max.
    generator = torch.Generator().manual_seed(1)
    left, _ = torch.linalg.qr(torch.randn(128, 64, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=generator))
    W = ((left * torch.logspace(0, -6, 64, dtype=torch.float64)) @ right.T).to(dtype)
    base, scaled = spectral.analyze(W)[0], spectral.analyze(W * 1e-3)[0]
    assert base.hard_rank == scaled.hard_rank == 32  # σᵢ = 10^(−6(i−1)/63) > 1e-3 for i ≤ 32
    assert base.collapsed_fraction == scaled.collapsed_fraction == 0.5
    assert base.collapsed and scaled.collapsed
    assert base.numerical_rank == scaled.numerical_rank
    absolute = spectral.analyze(W, atol=5e-4)[0], spectral.analyze(W * 1e-3, atol=5e-4)[0]
    assert (absolute[0].hard_rank, absolute[1].hard_rank) == (35, 4)  # σᵢ > 5e-4 vs σᵢ > 0.5


def test_hard_tolerance_never_below_the_dtype_noise_floor():
    W = planted(256, 256, 32, torch.bfloat16)
    row = spectral.analyze(W, rtol=0.0)[0]
    assert row.hard_tol == row.numerical_tol
    assert row.hard_rank == 32
    # Without the floor the bfloat16 rounding noise would count: it is above σ_max · 1e-9.
    assert float(row.singular_values[32]) > 1e-9 * row.sigma_max


# --- the other measures ------------------------------------------------------------------------


def test_measures_on_a_known_spectrum():
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    row = spectral.analyze(W)[0]
    assert (row.sigma_max, row.sigma_min, row.condition_number) == (3.0, 1.0, 3.0)
    assert row.frobenius_norm == pytest.approx(math.sqrt(14))
    assert row.stable_rank == pytest.approx(14 / 9)
    p = np.array([3, 2, 1]) / 6
    assert row.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert (row.energy_rank_90, row.energy_rank_99) == (2, 3)  # Σσ² fractions 9/14, 13/14, 1
    assert row.aspect_ratio == 1.0 and row.shape == (3, 3) and row.full_rank == 3


def test_identity_and_rank_one():
    eye = spectral.analyze(torch.eye(50, dtype=torch.float64))[0]
    assert eye.stable_rank == pytest.approx(50) and eye.effective_rank == pytest.approx(50)
    assert (eye.energy_rank_90, eye.energy_rank_99) == (45, 50)
    outer = torch.outer(torch.randn(40, dtype=torch.float64), torch.randn(30, dtype=torch.float64))
    one = spectral.analyze(outer)[0]
    assert one.hard_rank == one.numerical_rank == 1
    assert one.stable_rank == pytest.approx(1) and one.effective_rank == pytest.approx(1, abs=1e-9)
    assert one.condition_number > 1e12 and one.aspect_ratio == pytest.approx(40 / 30)


def test_singular_values_match_float64_reference_for_every_dtype():
    for dtype in ALL_DTYPES:
        W = torch.randn(70, 50, generator=torch.Generator().manual_seed(3)).to(dtype)
        row = spectral.analyze(W)[0]
        torch.testing.assert_close(row.singular_values, svdvals64(W), rtol=1e-12, atol=1e-12)


def test_zero_matrix():
    row = spectral.analyze(torch.zeros(6, 4))[0]
    assert (row.hard_rank, row.numerical_rank, row.energy_rank_90) == (0, 0, 0)
    assert (row.stable_rank, row.effective_rank, row.mp_edge, row.above_mp_edge) == (0, 0, 0, 0)
    assert row.condition_number == math.inf and row.collapsed and row.collapsed_fraction == 1.0


def test_collapse_rule_and_its_parameters():
    W = planted(64, 64, 60)  # 4 of 64 zero: 6.25 %
    assert not spectral.analyze(W)[0].collapsed  # default: more than 10 %
    assert spectral.analyze(W, collapse_fraction=0.0)[0].collapsed  # the blog's "any σ ≈ 0"
    report = spectral.analyze(W, collapse_fraction=0.05)
    assert report[0].collapsed and report.collapsed_layers == ["W"]
    # A random square matrix has σ_min → 0 (Marchenko–Pastur, Q = 1) but is not collapsed.
    square = spectral.analyze(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)))
    assert square[0].sigma_min < 0.01 * square[0].sigma_max and not square[0].collapsed


# --- Marchenko–Pastur --------------------------------------------------------------------------


def test_gaussian_matrix_has_nothing_above_the_mp_edge():
    # The top σ of a Gaussian matrix sits at the edge with Tracy–Widom fluctuations: above it
    # by a hair about 1 time in 6 (TW₁(0) ≈ 0.83), never by more than one σ.
    counts, ratios = [], []
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        W = 0.05 * torch.randn(400, 200, dtype=torch.float64, generator=generator)
        row = spectral.analyze(W)[0]
        s = W.norm().item() / math.sqrt(400 * 200)
        assert row.mp_edge == pytest.approx(s * (math.sqrt(400) + math.sqrt(200)))
        # the smallest σ sits at the lower edge s (√N − √M): full rank, as MP says for Q > 1
        assert 0.8 < row.sigma_min / (s * (math.sqrt(400) - math.sqrt(200))) < 1.3
        counts.append(row.above_mp_edge)
        ratios.append(row.sigma_max / row.mp_edge)
    assert max(counts) <= 1 and sum(counts) <= 6
    assert 0.97 < min(ratios) and max(ratios) < 1.01


@pytest.mark.parametrize("k", [1, 5, 12])
def test_planted_signal_above_the_mp_edge(k):
    generator = torch.Generator().manual_seed(k)
    noise = torch.randn(400, 200, dtype=torch.float64, generator=generator)
    signal = planted(400, 200, k, low=100.0, high=150.0, seed=k)
    row = spectral.analyze(noise + signal)[0]
    assert row.above_mp_edge == k


def test_marchenko_pastur_density_integrates_to_one_on_its_support():
    shape, variance = (300, 100), 0.7
    low = variance * (math.sqrt(300) - math.sqrt(100)) ** 2
    high = variance * (math.sqrt(300) + math.sqrt(100)) ** 2
    grid = torch.linspace(low, high, 200_001, dtype=torch.float64)
    density = spectral.marchenko_pastur_density(grid, shape, variance)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)
    outside = torch.tensor([low * 0.99, high * 1.01, 0.0], dtype=torch.float64)
    assert spectral.marchenko_pastur_density(outside, shape, variance).abs().max() == 0
    # Its mean is the mean eigenvalue of WᵀW, E‖W‖_F²/M = s² N.
    mean = torch.trapezoid(grid * density, grid).item()
    assert mean == pytest.approx(variance * 300, rel=1e-3)


# --- layer kinds -------------------------------------------------------------------------------


def conv_operator(conv, height, width):
    """The matrix B with conv(x) = B @ unfold(x) (per output position), built from unfold of the
    identity: column j of B is conv applied to the patch with a 1 in position j."""
    kh, kw = conv.kernel_size
    patch_size = conv.in_channels * kh * kw
    x = torch.randn(1, conv.in_channels, height, width, dtype=torch.float64)
    patches = F.unfold(x, (kh, kw))  # (1, in·kh·kw, L)
    out = F.conv2d(x, conv.weight.double(), groups=conv.groups).flatten(2)  # (1, out, L)
    # Solve out = B @ patches for B: unique when patches has full row rank.
    assert torch.linalg.matrix_rank(patches[0]) == patch_size, "input too small to pin B down"
    B = torch.linalg.lstsq(patches[0].T, out[0].T).solution.T
    assert B.shape == (conv.out_channels, patch_size)
    torch.testing.assert_close(B @ patches[0], out[0], rtol=1e-10, atol=1e-10)
    return B


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv2d_reshape_matches_an_explicit_unfold(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, (3, 2), groups=groups).double()
    B = conv_operator(conv, 9, 10)
    if groups == 1:
        torch.testing.assert_close(B, conv.weight.reshape(12, -1), rtol=1e-9, atol=1e-9)
    row = spectral.analyze(conv)[0]
    assert row.shape == (12, 8 * 3 * 2)
    torch.testing.assert_close(row.singular_values, svdvals64(B), rtol=1e-9, atol=1e-9)


def test_conv1d_and_conv3d_reshape():
    torch.manual_seed(0)
    conv1 = nn.Conv1d(4, 6, 5).double()
    x = torch.randn(1, 4, 20, dtype=torch.float64)
    patches = x.unfold(2, 5, 1)[0].permute(0, 2, 1).reshape(4 * 5, -1)  # (in·k, L), channel-major
    torch.testing.assert_close(
        conv1.weight.reshape(6, -1) @ patches, F.conv1d(x, conv1.weight)[0], rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        spectral.analyze(conv1)[0].singular_values, svdvals64(conv1.weight.reshape(6, -1))
    )
    conv3 = nn.Conv3d(2, 5, 3)
    row = spectral.analyze(conv3)[0]
    assert row.shape == (5, 54)
    torch.testing.assert_close(row.singular_values, svdvals64(conv3.weight.reshape(5, -1)))


def test_transposed_conv_is_the_adjoint_of_a_conv():
    torch.manual_seed(0)
    transposed = nn.ConvTranspose2d(4, 6, 3, groups=2).double()
    x = torch.randn(1, 6, 12, 12, dtype=torch.float64)
    y = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    # ⟨conv(x), y⟩ = ⟨x, conv_transpose(y)⟩ with the same kernel: the same operator's adjoint.
    forward = F.conv2d(x, transposed.weight, groups=2)
    adjoint = F.conv_transpose2d(y, transposed.weight, groups=2)
    assert torch.dot(forward.flatten(), y.flatten()).item() == pytest.approx(
        torch.dot(x.flatten(), adjoint.flatten()).item()
    )
    as_conv = nn.Conv2d(6, 4, 3, groups=2, bias=False).double()
    with torch.no_grad():
        as_conv.weight.copy_(transposed.weight)
    row = spectral.analyze(transposed)[0]
    assert row.shape == (4, 3 * 3 * 3 * 2)
    torch.testing.assert_close(row.singular_values, svdvals64(conv_operator(as_conv, 12, 12)))


def test_every_layer_kind_in_a_module():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(30, 12),
            "attn": nn.MultiheadAttention(12, 3),
            "cross": nn.MultiheadAttention(12, 3, kdim=7, vdim=5),
            "fc": nn.Linear(12, 20),
            "conv": nn.Conv2d(3, 4, 3),
            "lowrank": LowRankLinear(20, 16, rank=3),
            "norm": nn.LayerNorm(12),
        }
    )
    report = spectral.analyze(model)
    expected = {
        "emb": model.emb.weight,
        "attn.q_proj": model.attn.in_proj_weight[:12],
        "attn.k_proj": model.attn.in_proj_weight[12:24],
        "attn.v_proj": model.attn.in_proj_weight[24:],
        "attn.out_proj": model.attn.out_proj.weight,
        "cross.q_proj": model.cross.q_proj_weight,
        "cross.k_proj": model.cross.k_proj_weight,
        "cross.v_proj": model.cross.v_proj_weight,
        "cross.out_proj": model.cross.out_proj.weight,
        "fc": model.fc.weight,
        "conv": model.conv.weight.reshape(4, -1),
        "lowrank": model.lowrank.weight,
    }
    assert [row.name for row in report] == list(expected)
    for name, matrix in expected.items():
        row = report[name]
        assert row.shape == tuple(matrix.shape)
        torch.testing.assert_close(row.singular_values, svdvals64(matrix), rtol=1e-6, atol=1e-6)
    assert report["cross.k_proj"].shape == (12, 7) and report["lowrank"].factored


@pytest.mark.parametrize("core", ["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_factored_layer_equals_the_dense_svd(core, dtype):
    torch.manual_seed(0)
    layer = LowRankLinear(300, 200, rank=16, core=core, dtype=dtype)
    with torch.no_grad():
        spread = torch.linspace(0.5, 3.0, 16, dtype=dtype)
        if core == "full":
            layer.S.copy_(spread.diag() + 0.2 * torch.randn_like(layer.S))
        else:
            layer.S.mul_(spread)
        layer.U.add_(0.3 * torch.randn_like(layer.U))  # not orthonormal: the QR matters
    row = spectral.analyze(layer)[0]
    dense = svdvals64(layer.weight)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(row.singular_values[:16], dense[:16], rtol=tolerance, atol=0)
    assert row.singular_values[16:].abs().max() == 0  # exact zeros, not rounding noise
    assert (row.hard_rank, row.numerical_rank, row.full_rank) == (16, 16, 16)
    assert row.factored and row.kind == "LowRankLinear" and row.shape == (200, 300)
    assert not row.collapsed
    assert row.stable_rank == pytest.approx(spectral.analyze(layer.weight)[0].stable_rank)


def test_duck_typed_factored_module_and_its_bad_shapes():
    class Factored(nn.Module):
        def __init__(self, U, S, V):
            super().__init__()
            self.U, self.S, self.V = nn.Parameter(U), nn.Parameter(S), nn.Parameter(V)

    U, V = torch.randn(40, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    S = torch.randn(5, 5, dtype=torch.float64)
    row = spectral.analyze(Factored(U, S, V))[0]
    torch.testing.assert_close(row.singular_values, svdvals64(U @ S @ V.T), rtol=1e-10, atol=1e-12)
    assert row.factored and row.full_rank == 5
    with pytest.raises(ValueError, match=r"layer 'Factored': U, S, V of shapes .* do not form"):
        spectral.analyze(Factored(U, torch.randn(4), V))


def test_factored_rank_above_the_short_side():
    U, S, V = torch.randn(10, 6), torch.rand(6) + 0.5, torch.randn(4, 6)  # rank ≤ 4 < r = 6
    report = spectral.analyze({"f.U": U, "f.S": S, "f.V": V})
    torch.testing.assert_close(
        report["f"].singular_values, svdvals64((U * S) @ V.T), rtol=1e-5, atol=1e-6
    )
    assert report["f"].full_rank == 4 and report["f"].hard_rank == 4


def test_parametrized_layers_are_read_as_computed_and_left_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 20), nn.Conv2d(2, 3, 3))
    parametrizations.spectral_norm(model[0])
    parametrizations.orthogonal(model[1])

    class Scaled(nn.Module):
        def forward(self, weight):
            return 3.0 * weight

    parametrize.register_parametrization(model[2], "weight", Scaled())
    model.train()
    model[0](torch.randn(4, 30))  # a few power iterations, as in training
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    report = spectral.analyze(model)
    assert [row.kind for row in report] == ["ParametrizedLinear"] * 2 + ["ParametrizedConv2d"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), f"analysis changed {key}"
    assert all(module.training for module in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(report["0"].singular_values, svdvals64(model[0].weight))
    assert report["0"].sigma_max == pytest.approx(1.0, abs=1e-3)  # spectral_norm's job
    torch.testing.assert_close(
        report["1"].singular_values, torch.ones(20, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    original = model[2].parametrizations.weight.original.reshape(3, -1)
    torch.testing.assert_close(report["2"].singular_values, 3 * svdvals64(original))


def test_state_dict_kinds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.Linear(6, 8),
        LowRankLinear(8, 6, rank=2),
        nn.MultiheadAttention(8, 2),
    )
    state = model.state_dict()
    report = spectral.analyze({"model": state, "optimizer": {"state": {0: torch.randn(5, 5)}}})
    names = [row.name for row in report]
    assert names == [  # the state_dict's order, the factored layer included
        "model.0",
        "model.1",
        "model.2",
        "model.3.q_proj",
        "model.3.k_proj",
        "model.3.v_proj",
        "model.3.out_proj",
    ]
    assert report["model.2"].factored and report["model.2"].hard_rank == 2
    torch.testing.assert_close(
        report["model.2"].singular_values, svdvals64(model[2].weight), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        report["model.0"].singular_values, svdvals64(model[0].weight.reshape(4, -1))
    )
    module_report = spectral.analyze(model)
    for row in module_report:
        torch.testing.assert_close(
            report[f"model.{row.name}"].singular_values, row.singular_values, rtol=1e-6, atol=1e-6
        )


def test_analysis_keeps_the_float64_svd_for_half_weights_and_refuses_half_svd():
    W = planted(64, 48, 8, torch.float16)
    assert spectral.analyze(W, svd_dtype=torch.float32)[0].hard_rank == 8
    with pytest.raises(ValueError, match="'svd_dtype'.*never runs in half precision"):
        spectral.analyze(W, svd_dtype=torch.float16)


@pytest.mark.cuda
@requires_cuda
def test_cuda_svd_matches_cpu():
    W = planted(300, 200, 20, torch.float32).cuda()
    for svd_dtype in (torch.float32, torch.float64):
        row = spectral.analyze(W, svd_dtype=svd_dtype)[0]
        torch.testing.assert_close(row.singular_values, svdvals64(W.cpu()), rtol=1e-5, atol=1e-5)
        assert row.hard_rank == row.numerical_rank == 20
    layer = LowRankLinear(300, 200, rank=20, device="cuda")
    torch.testing.assert_close(
        spectral.analyze(layer)[0].singular_values[:20], svdvals64(layer.weight.cpu())[:20]
    )


# --- report formats and rank suggestions -------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), LowRankLinear(32, 24, rank=4), nn.Linear(24, 24))
    with torch.no_grad():
        model[2].weight.copy_(planted(24, 24, 3, torch.float32))
    return spectral.analyze(model)


def test_markdown_table(report):
    lines = report.to_markdown().splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| layer") and set(lines[1]) <= {"|", "-"}
    assert len({len(line) for line in lines}) == 1  # padded columns
    cells = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert cells[0] == "2" and cells[3] == "24×24" and cells[8] == "3" and cells[-1] == "yes (88%)"
    # The factored layer (rank 4 of 24×32): σ_min and cond over its 4 values, not the zeros.
    factored = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert float(factored[6]) == pytest.approx(report[1].singular_values[3].item(), rel=1e-3)
    assert float(factored[7]) == pytest.approx(report[1].condition_number, rel=1e-3)
    assert math.isfinite(report[1].condition_number) and factored[-1] == "no (0%)"
    assert "1 collapsed: 2" in report.summary()


def test_json_round_trip(report):
    document = json.loads(report.to_json(singular_values=True))
    assert document["settings"] == {
        "rtol": 1e-3,
        "atol": None,
        "collapse_fraction": 0.1,
        "rule": report.rule(),
    }
    for parsed, row in zip(document["layers"], report):
        assert parsed["name"] == row.name and parsed["shape"] == list(row.shape)
        assert parsed["hard_rank"] == row.hard_rank and parsed["sigma_max"] == row.sigma_max
        assert parsed["singular_values"] == row.singular_values.tolist()
    zero = json.loads(spectral.analyze(torch.zeros(3, 3)).to_json())
    assert zero["layers"][0]["condition_number"] is None  # inf is not JSON
    assert "singular_values" not in json.loads(report.to_json())["layers"][0]


def test_csv_round_trip(report):
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["name"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["shape"] == "24x24" and int(rows[2]["hard_rank"]) == 3
    assert float(rows[0]["stable_rank"]) == report[0].stable_rank
    assert rows[2]["collapsed"] == "True"
    assert float(rows[1]["condition_number"]) == report[1].condition_number  # factored: finite
    zero = next(csv.DictReader(io.StringIO(spectral.analyze(torch.zeros(3, 3)).to_csv())))
    assert float(zero["condition_number"]) == math.inf


def test_suggest_ranks_feeds_from_linear(report):
    for energy in (0.5, 0.9, 0.99, 1.0):
        ranks = spectral.suggest_ranks(report, energy=energy)
        for row in report:
            assert ranks[row.name] == energy_rank(row.singular_values, energy)
    ranks = spectral.suggest_ranks(report)
    assert ranks == {row.name: row.energy_rank_90 for row in report}
    linear = nn.Linear(16, 32)
    single = spectral.analyze(linear.weight, name="fc")
    # A random layer's 90 % rank is past its break-even rank (10): growth must be asked for.
    suggested = spectral.suggest_ranks(single)["fc"]
    assert suggested > break_even_rank(16, 32)
    converted = LowRankLinear.from_linear(linear, rank=suggested, allow_larger=True)
    assert converted.rank == single[0].energy_rank_90
    assert spectral.suggest_ranks(spectral.analyze(torch.zeros(3, 3)))["W"] == 1
    with pytest.raises(ValueError, match="'energy'"):
        spectral.suggest_ranks(report, energy=0.0)
    with pytest.raises(TypeError, match="'obj'"):
        spectral.suggest_ranks([report])


def test_report_indexing(report):
    assert report["2"] is report[2] and len(report) == 3 and list(report) == list(report.rows)
    with pytest.raises(KeyError, match="no layer named 'fc9'"):
        report["fc9"]


# --- figures -----------------------------------------------------------------------------------


def test_figures_are_written(tmp_path, report):
    from lowrank_ext.plots import spectral as spectral_plots

    paths = spectral_plots.save_report_figures(report, tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in paths} == {
        "sigma_min_histogram.png",
        "spectra.png",
        "esd/0.png",
        "esd/1.png",
        "esd/2.png",
    }
    compared = spectral_plots.plot_sigma_min_histogram(
        {"a": report, "b": report}, tmp_path / "cmp.png", relative=False
    )
    for path in [*paths, compared]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_figures_without_matplotlib_say_how_to_install(monkeypatch, tmp_path, report):
    from lowrank_ext.plots import spectral as spectral_plots

    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install lowrank_ext\[plot\]"):
        spectral_plots.plot_spectra(report, tmp_path / "x.png")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "error", "match"),
    [
        (42, TypeError, "argument 'obj' must be an nn.Module, a state_dict"),
        (torch.randn(5), ValueError, r"argument 'obj': a weight matrix needs ≥ 2 dims.*\(5,\)"),
        ({}, ValueError, "argument 'obj': the state_dict is empty"),
        ({"b": torch.randn(3), "n": 3}, ValueError, "state_dict holds no weight matrix"),
        (nn.ReLU(), ValueError, "the ReLU has no layer with a weight matrix"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "must be real floating point"),
        (torch.zeros(0, 3), ValueError, "empty weight of shape 0×3"),
        (nn.LazyLinear(4), ValueError, "lazy and not initialized"),
        (nn.Linear(3, 4, device="meta"), ValueError, "layer 'Linear' is on the meta device"),
        (
            {"a.U": torch.randn(4, 2), "a.S": torch.randn(3), "a.V": torch.randn(5, 2)},
            ValueError,
            "layer 'a': U, S, V of shapes",
        ),
    ],
)
def test_bad_objects(obj, error, match):
    with pytest.raises(error, match=match):
        spectral.analyze(obj)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_name_the_layer(bad):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[2, 3] = bad
    kind = "1 NaN, 0 ±Inf" if math.isnan(bad) else "0 NaN, 1 ±Inf"
    with pytest.raises(ValueError, match=rf"layer '1' has non-finite weights \({kind}\)"):
        spectral.analyze(model)
    factors = {"fc.U": torch.full((3, 1), bad), "fc.S": torch.ones(1), "fc.V": torch.ones(4, 1)}
    with pytest.raises(ValueError, match="layer 'fc' has non-finite"):
        spectral.analyze(factors)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": -1e-3}, "argument 'rtol' must be a number in \\[0, 1\\)"),
        ({"rtol": 1.0}, "argument 'rtol'"),
        ({"rtol": math.nan}, "argument 'rtol'"),
        ({"rtol": "1e-3"}, "argument 'rtol'"),
        ({"rtol": True}, "argument 'rtol'"),
        ({"atol": -1.0}, "argument 'atol' must be a number in \\[0, inf\\)"),
        ({"atol": math.inf}, "argument 'atol'"),
        ({"collapse_fraction": 1.0}, "argument 'collapse_fraction'"),
        ({"svd_dtype": torch.bfloat16}, "argument 'svd_dtype'"),
    ],
)
def test_bad_tolerances(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral.analyze(torch.eye(3), **kwargs)


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_row_metrics_do_not_depend_on_the_weight_scale(scale):
    # σ² of 1e-200 (1e200) under- (over-)flows in float64: stable rank, Frobenius norm, the
    # Marchenko–Pastur edge and the energy ranks are computed from σ/σ_max instead.
    torch.manual_seed(0)
    weight = torch.randn(6, 8, dtype=torch.float64)
    sigma = torch.linalg.svdvals(weight)

    def model(w):
        layer = torch.nn.Linear(8, 6, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(w)
        head = torch.nn.Linear(6, 3, dtype=torch.float64)  # the output layer: not suggested
        return torch.nn.Sequential(layer, torch.nn.ReLU(), head)

    row = spectral.analyze(model(weight * scale)).rows[0]
    expected_stable = float((sigma**2).sum() / sigma[0] ** 2)
    assert row.stable_rank == pytest.approx(expected_stable, rel=1e-12)
    assert row.frobenius_norm / scale == pytest.approx(float(torch.linalg.norm(weight)), rel=1e-12)
    power = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
    assert row.energy_rank_90 == int((power < 0.9).sum()) + 1
    assert spectral.suggest_ranks(model(weight * scale)) == {"0": row.energy_rank_90}
