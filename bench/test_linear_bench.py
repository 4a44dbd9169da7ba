"""pytest-benchmark suite: every implementation, shape, dtype and pass of cases.py.

    .venv/bin/python -m pytest bench/ --benchmark-only     # small CPU set, a few minutes
    LOWRANK_BENCH_FULL=1 ...          # the run.py shapes (small, large and --full), fp32 and fp64
    LOWRANK_BENCH_MAX_AUTOTUNE=1 ...  # also torch.compile(mode="max-autotune")

Every implementation of cases.IMPLS is benchmarked, two_linear (the bar) among them. The default
set has two small-batch shapes (B=1 768→768 r=32, B=64 4096→4096 r=64) and two larger ones.
Benchmarks are grouped by shape and pass, so pytest-benchmark's table compares the
implementations side by side. A round is as many calls as last ~2 ms
(timing.calls_per_sample), so microsecond calls are not lost in timer overhead; times are per
call. For ratios on a shared machine prefer bench/run.py, which interleaves the
implementations. The CUDA cases (small rows and the run.py large preset) are added only where a
GPU is present; each round ends in torch.cuda.synchronize() so the wall clock covers the
kernels, not just their launch.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from cases import (
    FULL,
    IMPLS,
    LARGE,
    MAX_AUTOTUNE,
    PASSES,
    SMALL,
    Shape,
    dtype_name,
    grid,
    make_problem,
    make_step,
)
from correctness import Reference, check
from timing import calls_per_sample, copies_for_cold_cache

import lowrank_ext

FULL_SET = os.environ.get("LOWRANK_BENCH_FULL", "") not in ("", "0")
ALL_IMPLS = IMPLS + ((MAX_AUTOTUNE,) if os.environ.get("LOWRANK_BENCH_MAX_AUTOTUNE") else ())


def _cases():
    """(device, dtype, shape) triples. Default: a small CPU set that runs in a few minutes."""
    if FULL_SET:
        cpu = SMALL + LARGE["cpu"] + FULL["cpu"]
        cpu_dtypes = ("float32", "float64")
    else:
        cpu = [Shape(1, 768, 768, 32), Shape(64, 4096, 4096, 64)]
        cpu += grid([1024], [(2048, 2048)], [16, 128])
        cpu_dtypes = ("float32",)
    cases = [
        ("cpu", torch.float32 if d == "float32" else torch.float64, s)
        for d, s in itertools.product(cpu_dtypes, dict.fromkeys(cpu))
    ]
    if torch.cuda.is_available() and lowrank_ext.build_info()["cuda_kernels"]:
        cuda = SMALL + (FULL if FULL_SET else LARGE)["cuda"]
        cases += [("cuda", torch.bfloat16, s) for s in dict.fromkeys(cuda)]
    return cases


def _case_id(case):
    device, dtype, s = case
    core = "" if s.core == "diag" else "-fullS"
    return (
        f"{device}-{dtype_name(dtype)}-B{s.batch}-{s.in_features}x{s.out_features}-r{s.rank}{core}"
    )


@pytest.fixture(scope="module")
def problems():
    """One problem (inputs + float64 reference) alive at a time, reused across impls/passes."""
    cache = {}

    def get(case):
        if case not in cache:
            cache.clear()  # free the previous shape's tensors first
            device, dtype, shape = case
            dev = torch.device(device)
            elt = torch.empty((), dtype=dtype).element_size()
            per_copy = elt * shape.batch * (shape.in_features + shape.out_features)
            copies = copies_for_cold_cache(per_copy, dev)
            problem = make_problem(shape, dtype, dev, copies=copies)
            cache[case] = (problem, Reference(problem), copies)
        return cache[case]

    return get


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_linear(benchmark, problems, case, impl, pass_):
    device, dtype, shape = case
    problem, ref, copies = problems(case)
    step = make_step(impl, problem, pass_)
    check(impl, pass_, problem, ref, step(0))  # never time a wrong answer; also compiles
    dev = torch.device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    counter = itertools.count()
    # Calls per round: as many as last ~2 ms (one for a slower call, and where benchmarking is
    # disabled: the test then runs once, as a smoke test). pytest-benchmark divides a round's
    # time by them, so every implementation is reported per call.
    calls = calls_per_sample(step, dev, copies) if benchmark.enabled else 1

    def timed():
        i = next(counter)
        step(i % copies)  # rotate the inputs so large ones are cold in cache
        if i % calls == calls - 1:
            sync()  # once per round: the GPU is timed back to back, as in run.py

    benchmark.group = f"{device} {dtype_name(dtype)} {shape.label()} {pass_}"
    benchmark.extra_info.update(
        impl=impl, pass_=pass_, copies=copies, calls_per_round=calls, **vars(shape)
    )
    # Fixed rounds: one dense fwd+bwd call is seconds on a small CPU; calibration would repeat it.
    rounds = 20 if device == "cuda" else 10
    benchmark.pedantic(timed, rounds=rounds, iterations=calls, warmup_rounds=1)
