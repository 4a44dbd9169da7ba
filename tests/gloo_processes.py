"""Run a test scenario in several gloo processes on CPU, with a deadline."""

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, scenario, world: int, out: str) -> None:
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = scenario(rank, Path(out))
        result["params"] = {k: v.detach().clone() for k, v in result["params"].items()}
        torch.save(result, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_processes(scenario, world: int, tmp_path: Path, timeout_s: float) -> list[dict]:
    """scenario(rank, out_dir) -> dict with "params" in each of `world` processes; their dicts.

    `scenario` must be a module-level function (the processes are spawned). A run that hangs
    is killed after timeout_s and fails the test.
    """
    context = mp.start_processes(
        _worker,
        args=(scenario, world, str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):  # raises if a worker raised, with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{scenario.__name__}: {world} processes did not finish in {timeout_s} s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
