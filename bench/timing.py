"""Timing: calls per sample, then `repeats` timed samples of each step; median and quartiles.

A sample is k back-to-back calls of one step, and its time divided by k is one per-call time.
k is chosen per step (calls_per_sample) so that a sample lasts at least ~2 ms: a call that takes
microseconds (small batches) is then not drowned by the timer and loop overhead, and a call that
takes longer than that is timed alone (k = 1).

CPU: wall clock (perf_counter) around each sample (the ops are synchronous). CUDA: a pair of
events around each sample on the current stream, read after one synchronize at the end, so the
GPU time is measured and the host only has to keep the queue full, as in a training loop; where
the host cannot (launch-bound small batches), the GPU idles inside the sample and that counts.

Inputs rotate over `copies` independent copies, call by call, so that large inputs are cold in
cache (copies_for_cold_cache); inputs so small that no number of copies could make them cold get
one copy, and the factors stay cache-resident, as in a loop over one layer.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

TARGET_SAMPLE_S = 2e-3  # a sample lasts at least this long (k calls of a fast step)
MAX_COPIES = 16


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return 32 << 20  # a server L3 share


def copies_for_cold_cache(bytes_per_copy: int, device: torch.device) -> int:
    """How many input copies to rotate through so each call finds its inputs cold in cache:
    together they must exceed twice the last-level cache (L2 on a GPU). 1 where even
    MAX_COPIES copies would not: such inputs are warm whatever one does."""
    cache = last_level_cache_bytes(device)
    if MAX_COPIES * bytes_per_copy <= 2 * cache:
        return 1
    return min(MAX_COPIES, math.ceil(2 * cache / max(bytes_per_copy, 1)) + 1)


def _run(step, calls: int, start: int, copies: int) -> None:
    for j in range(start, start + calls):
        step(j % copies)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calls_per_sample(
    step, device: torch.device, copies: int = 1, target_s: float = TARGET_SAMPLE_S
) -> int:
    """The number of back-to-back calls of `step` that lasts at least target_s (wall clock,
    synchronized on CUDA). Each estimate is the fastest of 3 tries, so one stall on a shared
    machine does not make a fast step look slow; a step far slower than the target is timed
    once. Also warms the step up."""
    calls = 1
    while True:
        elapsed = math.inf
        for _ in range(3):
            _synchronize(device)
            t0 = time.perf_counter()
            _run(step, calls, 0, copies)
            _synchronize(device)
            elapsed = min(elapsed, time.perf_counter() - t0)
            if elapsed >= 25 * target_s:
                break
        if elapsed >= target_s:
            return calls
        calls = max(2 * calls, math.ceil(1.2 * calls * target_s / max(elapsed, 1e-9)))


def measure(
    steps: dict,
    copies: int,
    device: torch.device,
    warmup: int,
    repeats: int,
    tick=None,
    calls: dict | None = None,
):
    """Seconds per call of each step(i), i rotating over `copies` inputs: {name: [seconds]},
    one entry per sample of calls[name] calls (default 1).

    The steps run round-robin, one sample each per round, starting one further along every
    round: on a shared machine, load that comes and goes then hits every implementation alike,
    and the same-run ratios stay meaningful even when the absolute times drift. `tick()` after
    a round. `warmup` untimed rounds first.
    """
    names = list(steps)
    calls = {name: (calls or {}).get(name, 1) for name in names}
    for i in range(warmup):
        for name in names:
            _run(steps[name], calls[name], i * calls[name], copies)
    cuda = device.type == "cuda"
    _synchronize(device)
    pending = {name: [] for name in names}  # CUDA: event pairs; CPU: seconds per call
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            n = calls[name]
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                _run(steps[name], n, i * n, copies)
                end.record()
                pending[name].append((start, end))
            else:
                t0 = time.perf_counter()
                _run(steps[name], n, i * n, copies)
                pending[name].append((time.perf_counter() - t0) / n)
        if tick is not None:
            tick()
    if not cuda:
        return pending
    torch.cuda.synchronize(device)
    return {
        name: [s.elapsed_time(e) / 1e3 / calls[name] for s, e in pairs]
        for name, pairs in pending.items()
    }


def summarize(times: list[float]) -> dict:
    q1, median, q3 = (
        statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    )
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "times_s": times}
