"""OIALR under DistributedDataParallel: two gloo processes on CPU reach the same ranks and
bitwise the same parameters, also when their cores drift apart before an update."""

from pathlib import Path

import torch
from gloo_processes import run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank_ext import OIALR

WORLD = 2
STEPS = 10
TIMEOUT_S = 180


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(128, 24),
        nn.Tanh(),
        nn.Linear(24, 3),
    ).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _train(rank: int | None, drift: bool = False) -> dict:
    """DDP training with OIALR (one process when rank is None); rank 1 perturbs its cores
    before each update when `drift`, which the broadcast from process 0 must undo."""
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=3, cutoff=0.4)
    wrapped = model if rank is None else DistributedDataParallel(model)
    rebuilt, losses = 0, []
    for step, (x, y) in enumerate(_batches(), start=1):
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        optimizer.step()
        if drift and rank == 1 and oialr.converted and (step - 2) % 3 == 0:
            with torch.no_grad():
                for layer in oialr._managed.values():
                    layer.S.add_(1e-3 * torch.randn_like(layer.S))
        losses.append(loss.item())
        if oialr.step() and rank is not None:
            # Parameters were replaced or resized: DDP needs a new wrapper (and its buckets).
            wrapped = DistributedDataParallel(model)
            rebuilt += 1
    return {
        "params": dict(model.named_parameters()),
        "ranks": oialr.ranks(),
        "history": oialr.history,
        "rebuilt": rebuilt,
        "losses": losses,
    }


def _ddp(rank: int, out: Path) -> dict:
    return _train(rank)


def _ddp_drift(rank: int, out: Path) -> dict:
    return _train(rank, drift=True)


def _assert_identical(results: list[dict]) -> None:
    first, second = results
    assert first["ranks"] == second["ranks"] and first["history"] == second["history"]
    assert first["params"].keys() == second["params"].keys()
    for name, param in first["params"].items():
        assert torch.equal(param, second["params"][name]), name
    assert first["rebuilt"] >= 2  # the conversion and at least one prune
    assert any(r < 8 for r in first["ranks"].values())


def test_ddp_processes_agree_and_match_one_process(tmp_path):
    results = run_processes(_ddp, WORLD, tmp_path, TIMEOUT_S)
    _assert_identical(results)
    single = _train(None)
    assert single["ranks"] == results[0]["ranks"]
    for name, param in single["params"].items():
        torch.testing.assert_close(
            results[0]["params"][name], param.detach(), rtol=1e-9, atol=1e-12
        )


def test_ddp_decisions_come_from_process_zero(tmp_path):
    _assert_identical(run_processes(_ddp_drift, WORLD, tmp_path, TIMEOUT_S))
