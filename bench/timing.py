"""Timing of one step: warm-up, then `repeats` timed calls; median and quartiles.

CPU: wall clock around each call (the ops are synchronous). CUDA: a pair of events around each
call on the current stream, read after one synchronize at the end, so the host's launch
overhead is hidden exactly as it is in a training loop.
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


def measure(step, copies: int, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of step(i), i rotating over `copies` inputs."""
    for i in range(warmup):
        step(i % copies)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            step(i % copies)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(i % copies)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    q1, median, q3 = (
        statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    )
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "times_s": times}
