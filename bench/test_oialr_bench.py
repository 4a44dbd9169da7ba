"""pytest-benchmark suite: one OIALR training step, dense vs lowrank_ext vs rebuild-W.

    .venv/bin/python -m pytest bench/test_oialr_bench.py --benchmark-only

OIALR (arXiv:2401.08505) trains W = U S Vᵀ with U, V frozen and the r×r core S and the biases
trainable. A training step here is zero_grad, forward, cross-entropy, backward and
torch.optim.Adam.step() over the trainable parameters only, in three variants of one model:

- dense: the nn.Linear / nn.Conv2d model, every weight trained;
- lowrank: `lowrank_ext.convert(model, rank_pattern=..., core="full")` with U and V frozen on
  every converted layer (the layer state OIALR trains in); W is never formed;
- rebuild_w: `bench/rebuild_w.rebuild_w_copy` of lowrank, the reference-code style that rebuilds
  W = U S Vᵀ and runs the dense layer on it in every forward.

Ranks are a fraction of min(in, out) per converted layer (in = in_channels·kh·kw for a conv);
the output layer stays dense, as convert's default. lowrank and rebuild_w start from the same
factors and are checked to give the same loss and gradients before anything is timed. Each case
is one group, so pytest-benchmark's table compares the variants side by side; those run one after
the other, so on a shared machine load can drift between them. test_oialr_interleaved times the
three round-robin in one measurement and gives the same-run medians and ratios (in the JSON's
extra_info; printed with -s). Threads: torch's default (OMP_NUM_THREADS sets it), as the other
bench files.
"""

from __future__ import annotations

import copy
import re
import statistics
from dataclasses import dataclass

import pytest
import torch
from rebuild_w import rebuild_w_copy
from timing import measure
from torch import nn

import lowrank_ext

LOW_RANK = (lowrank_ext.LowRankLinear, lowrank_ext.LowRankConv2d)
VARIANTS = ("dense", "lowrank", "rebuild_w")


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256 * 4 * 4, 10),
    )


@dataclass(frozen=True)
class Case:
    build: object
    input_shape: tuple[int, ...]  # batch first
    fraction: float  # rank / min(in, out) per converted layer
    rounds: int  # per variant, in each test_oialr_step and in test_oialr_interleaved


CASES = {
    "mlp-1024-2048x3-B256-r25%": Case(_mlp, (256, 1024), 0.25, 10),
    "mlp-1024-2048x3-B256-r10%": Case(_mlp, (256, 1024), 0.10, 10),
    "cnn-64-128-256-32px-B64-r25%": Case(_cnn, (64, 3, 32, 32), 0.25, 10),
}
CLASSES = 10


def _dense_in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    return module.in_features, module.out_features


def _convert(dense: nn.Module, fraction: float) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `dense` converted at `fraction` of each layer's full rank, U and V frozen."""
    model = copy.deepcopy(dense)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    targets = layers[:-1]  # convert's default targets: all but the output layer
    modules = dict(model.named_modules())
    ranks = {n: max(1, round(fraction * min(_dense_in_out(modules[n])))) for n in targets}
    lowrank_ext.convert(
        model, rank_pattern={re.escape(n): r for n, r in ranks.items()}, core="full"
    )
    assert lowrank_ext.ranks(model) == ranks
    for module in model.modules():
        if isinstance(module, LOW_RANK):
            module.U.requires_grad_(False)
            module.V.requires_grad_(False)
    return model, ranks


def _loss_and_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _check_same_function(lowrank, rebuild, x, target):
    """lowrank and rebuild_w train the same parameters of the same function: the loss agrees in
    float32, and the loss and every gradient in float64 (on copies, to 1e-9 relative: float32
    sums the batch in different orders in the two, which alone moves dS by ~1e-3 of its max)."""
    frozen = [p for m in lowrank.modules() if isinstance(m, LOW_RANK) for p in (m.U, m.V)]
    assert frozen and not any(p.requires_grad for p in frozen)
    torch.testing.assert_close(
        _loss_and_grads(rebuild, x, target)[0],
        _loss_and_grads(lowrank, x, target)[0],
        rtol=1e-5,
        atol=1e-6,
    )
    loss_a, grads_a = _loss_and_grads(copy.deepcopy(lowrank).double(), x.double(), target)
    loss_b, grads_b = _loss_and_grads(copy.deepcopy(rebuild).double(), x.double(), target)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    assert list(grads_b) == list(grads_a)
    for name, grad in grads_a.items():
        err, scale = (grads_b[name] - grad).abs().max(), grad.abs().max()
        assert err <= 1e-9 * scale + 1e-15, (
            f"{name}: gradient differs by {err:.3g} (max {scale:.3g})"
        )


def _trainer(model: nn.Module, x, target):
    """One training step: zero_grad, forward, loss, backward, Adam over trainable parameters."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


@pytest.fixture(scope="module")
def trainers():
    """The three steps of one case, alive one case at a time; checked when first built."""
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()  # free the previous case's models first
            case = CASES[name]
            torch.manual_seed(0)
            dense = case.build()
            x = torch.randn(case.input_shape)
            target = torch.randint(0, CLASSES, (case.input_shape[0],))
            lowrank, ranks = _convert(dense, case.fraction)
            rebuild = rebuild_w_copy(lowrank)
            _check_same_function(lowrank, rebuild, x, target)  # never time a different model
            models = {"dense": dense, "lowrank": lowrank, "rebuild_w": rebuild}
            trained = {
                v: sum(p.numel() for p in m.parameters() if p.requires_grad)
                for v, m in models.items()
            }
            steps = {v: _trainer(m, x, target) for v, m in models.items()}
            cache[name] = (steps, {"ranks": ranks, "trained_params": trained})
        return cache[name]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_oialr_step(benchmark, trainers, case, variant):
    steps, info = trainers(case)
    step = steps[variant]
    assert torch.isfinite(step())  # first step: Adam allocates its state outside the timing
    benchmark.group = f"oialr step {case}"
    benchmark.extra_info.update(
        variant=variant,
        ranks=info["ranks"],
        trained_params=info["trained_params"][variant],
        threads=torch.get_num_threads(),
    )
    benchmark.pedantic(step, rounds=CASES[case].rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("case", list(CASES))
def test_oialr_interleaved(benchmark, trainers, case):
    """The three variants round-robin, one step each per round (bench/timing.measure): load
    that comes and goes on a shared machine hits them alike, so these same-run medians and
    ratios (in extra_info, and printed with -s) hold up where the per-variant groups drift."""
    steps, info = trainers(case)
    rounds = CASES[case].rounds
    calls = {v: (lambda _i, step=steps[v]: step()) for v in VARIANTS}
    times = benchmark.pedantic(
        measure, args=(calls, 1, torch.device("cpu"), 1, rounds), rounds=1, iterations=1
    )
    median = {v: statistics.median(t) for v, t in times.items()}
    ratios = {
        "dense/lowrank": median["dense"] / median["lowrank"],
        "rebuild_w/lowrank": median["rebuild_w"] / median["lowrank"],
    }
    benchmark.group = "oialr interleaved (whole measurement; see extra_info)"
    benchmark.extra_info.update(
        median_ms={v: 1e3 * m for v, m in median.items()},
        ratios=ratios,
        ranks=info["ranks"],
        threads=torch.get_num_threads(),
    )
    print(
        f"\n{case}: median ms "
        + ", ".join(f"{v} {1e3 * m:.1f}" for v, m in median.items())
        + "; "
        + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())
    )
