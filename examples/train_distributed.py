"""Data-parallel training of a low-rank MLP with torchrun; prints each process's throughput.

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py
    torchrun --standalone --nproc_per_node=8 examples/train_distributed.py --strategy fsdp \\
        --width 4096 --rank 128 --batch-size 1024 --compile --save checkpoint.pt

One process per GPU with NCCL where CUDA is available, else one per CPU slot with gloo. Every
process draws its own batches from one synthetic task (labels from a fixed random teacher of
rank 8), so the loss falls quickly and no data set has to be downloaded. `--strategy ddp`
replicates the model (DistributedDataParallel); `--strategy fsdp` shards every factor of every
LowRankLinear across the processes (FSDP2 `fully_shard`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lowrank_ext import LowRankLinear

CLASSES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--width", type=int, default=1024, help="input and hidden features")
    parser.add_argument("--rank", type=int, default=32, help="rank of every LowRankLinear")
    parser.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    parser.add_argument("--batch-size", type=int, default=256, help="per process")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--save", help="write the trained model's full state_dict here")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("launch with torchrun: torchrun --standalone --nproc_per_node=2 " + __file__)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}), got {args.warmup}")
    return args


def build_model(args, device) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [LowRankLinear(args.width, args.width, args.rank, device=device), nn.GELU()]
    layers.append(nn.Linear(args.width, CLASSES, device=device))
    return nn.Sequential(*layers)


def parallelize(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    if strategy == "ddp":
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, LowRankLinear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = parallelize(build_model(args, device), args.strategy, device)
    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    teacher = torch.randn(args.width, 8, device=device) @ torch.randn(8, CLASSES, device=device)
    data = torch.Generator(device=device).manual_seed(1000 + rank)  # each process its own batches

    losses = []
    for step in range(args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        x = torch.randn(args.batch_size, args.width, device=device, generator=data)
        loss = nn.functional.cross_entropy(step_fn(x), (x @ teacher).argmax(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    synchronize(device)
    elapsed = time.perf_counter() - started

    timed = args.steps - args.warmup
    mine = torch.tensor([timed * args.batch_size / elapsed, 1e3 * elapsed / timed], device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    ends = torch.stack([losses[0], losses[-1]])
    dist.all_reduce(ends)  # summed over processes; each process's loss is its batch's mean
    if rank == 0:
        print(
            f"{args.strategy}, {world} process(es) on {device.type} ({dist.get_backend()}), torch "
            f"{torch.__version__}; width {args.width}, rank {args.rank}, depth {args.depth}, "
            f"batch {args.batch_size}/process, {timed} timed steps"
        )
        for r, (throughput, step_ms) in enumerate(t.tolist() for t in everyone):
            print(f"  process {r}: {throughput:10.0f} samples/s  {step_ms:7.2f} ms/step")
        total = sum(t[0].item() for t in everyone)
        print(f"  all:       {total:10.0f} samples/s")
        first, last = (ends / world).tolist()
        print(f"  loss {first:.3f} -> {last:.3f} (mean over processes, first and last step)")

    if args.save:
        # Collective: every process takes part in gathering FSDP shards; rank 0 writes.
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            torch.save(state, args.save)
            print(f"  saved {args.save}")
    dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
