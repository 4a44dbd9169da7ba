"""DDP and FSDP2 (fully_shard) with low-rank modules: two gloo processes on CPU.

Each test spawns two processes that train on their halves of the same global batches and write
what they hold afterwards; the test checks both processes agree, and agree with one process
training on the whole global batch (DDP and FSDP average gradients, so the two must match to
float64 rounding). A run that hangs is killed after TIMEOUT_S and fails the test.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from gloo_processes import run_processes
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lowrank_ext import LowRankLinear

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8
TIMEOUT_S = 180
TOL = {"rtol": 1e-9, "atol": 1e-12}


def _model(ranks=(4, 3)) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        LowRankLinear(16, 32, ranks[0]), nn.GELU(), LowRankLinear(32, 8, ranks[1], core="full")
    ).double()


def _batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 16, generator=g, dtype=torch.float64
    )
    batches = []
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 16, generator=g, dtype=torch.float64)
        batches.append(
            (
                x,
                x @ teacher.T
                + 0.1 * torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64),
            )
        )
    return batches


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _train(model, optimizer, batches, rank=None) -> list[float]:
    """Steps on each global batch (this rank's half of it when rank is given); global losses."""
    losses = []
    for x, y in batches:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if rank is not None:  # the global batch's loss: the mean of the equal halves' losses
            dist.all_reduce(loss)
            loss /= WORLD
        losses.append(loss.item())
    return losses


def _ddp(rank: int, out: Path) -> dict:
    model = DistributedDataParallel(_model())
    losses = _train(model, _optimizer(model), _batches(), rank)
    return {"losses": losses, "params": dict(model.module.named_parameters())}


def _fsdp(rank: int, out: Path) -> dict:
    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, LowRankLinear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    shard_shapes = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    losses = _train(model, _optimizer(model), _batches(), rank)
    params = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {"losses": losses, "params": params, "shard_shapes": shard_shapes}


def _ddp_checkpoint(rank: int, out: Path) -> dict:
    """Train 2 steps, save on rank 0, rebuild at other ranks on both, load, train 2 more."""
    batches = _batches()
    model = DistributedDataParallel(_model())
    optimizer = _optimizer(model)
    losses = _train(model, optimizer, batches[:2], rank)
    if rank == 0:
        torch.save(
            {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
            out / "checkpoint.pt",
        )
    dist.barrier()
    checkpoint = torch.load(out / "checkpoint.pt")
    # Built at ranks (2, 1): loading adopts the saved ranks (4, 3), then DDP and a new optimizer.
    restored = _model(ranks=(2, 1))
    restored.load_state_dict(checkpoint["model"])
    restored = DistributedDataParallel(restored)
    optimizer = _optimizer(restored)
    optimizer.load_state_dict(checkpoint["optimizer"])
    losses += _train(restored, optimizer, batches[2:], rank)
    return {"losses": losses, "params": dict(restored.module.named_parameters())}


SCENARIOS = {"ddp": _ddp, "fsdp": _fsdp, "ddp_checkpoint": _ddp_checkpoint}


def _run(scenario: str, tmp_path: Path) -> list[dict]:
    return run_processes(SCENARIOS[scenario], WORLD, tmp_path, TIMEOUT_S)


def _single_process(steps: int = STEPS) -> dict:
    model = _model()
    losses = _train(model, _optimizer(model), _batches(steps))
    return {"losses": losses, "params": dict(model.named_parameters())}


def _assert_matches_single_process(results: list[dict]) -> None:
    first, second = results
    assert first["params"].keys() == second["params"].keys()
    for name, param in first["params"].items():
        # Both processes apply the same averaged gradient: bitwise the same parameters.
        assert torch.equal(param, second["params"][name]), name
    assert first["losses"] == second["losses"]
    single = _single_process()
    assert len(first["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(single["losses"]), **TOL)
    assert single["losses"][-1] < single["losses"][0]  # it trained
    assert first["params"].keys() == single["params"].keys()
    for name, param in single["params"].items():
        torch.testing.assert_close(first["params"][name], param.detach(), **TOL, msg=name)


def test_ddp_matches_single_process(tmp_path):
    _assert_matches_single_process(_run("ddp", tmp_path))


def test_fsdp2_fully_shard_matches_single_process(tmp_path):
    results = _run("fsdp", tmp_path)
    # Each process held half of every factor (dim 0, padded when odd), not a replica.
    shapes = results[0]["shard_shapes"]
    assert shapes["0.U"] == (16, 4) and shapes["0.V"] == (8, 4) and shapes["2.S"] == (2, 3)
    _assert_matches_single_process(results)


def test_ddp_checkpoint_resumes_exactly(tmp_path):
    results = _run("ddp_checkpoint", tmp_path)
    _assert_matches_single_process(results)
    assert results[0]["params"]["0.U"].shape == (32, 4)  # the saved rank, not the built one
