"""Timing: warm-up, then `repeats` timed calls of each step; median and quartiles.

CPU: wall clock around each call (the ops are synchronous). CUDA: a pair of events around each
call on the current stream, read after one synchronize at the end, so the GPU time is measured
and the host only has to keep the queue full, as in a training loop.
"""

from __future__ import annotations

import math
import statistics
import time

import torch


def copies_for_cold_cache(bytes_per_copy: int, device: torch.device) -> int:
    """How many input copies to rotate through so each call finds its inputs cold in cache:
    together they must exceed twice the last-level cache (L2 on a GPU)."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    else:
        cache = 32 << 20  # a server L3 share; at the benchmark shapes one copy already exceeds it
    return max(1, min(16, math.ceil(2 * cache / max(bytes_per_copy, 1)) + 1))


def measure(steps: dict, copies: int, device: torch.device, warmup: int, repeats: int, tick=None):
    """Seconds per call of each step(i), i rotating over `copies` inputs: {name: [seconds]}.

    The steps run round-robin, one call each per round, starting one further along every round:
    on a shared machine, load that comes and goes then hits every implementation alike, and the
    same-run ratios stay meaningful even when the absolute times drift. `tick()` after a round.
    """
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i % copies)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    pending = {name: [] for name in names}  # CUDA: event pairs; CPU: seconds
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                steps[name](i % copies)
                end.record()
                pending[name].append((start, end))
            else:
                t0 = time.perf_counter()
                steps[name](i % copies)
                pending[name].append(time.perf_counter() - t0)
        if tick is not None:
            tick()
    if not cuda:
        return pending
    torch.cuda.synchronize(device)
    return {n: [s.elapsed_time(e) / 1e3 for s, e in pairs] for n, pairs in pending.items()}


def summarize(times: list[float]) -> dict:
    q1, median, q3 = (
        statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    )
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "times_s": times}
