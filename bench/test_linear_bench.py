"""pytest-benchmark suite: every implementation, shape, dtype and pass of cases.py.

    .venv/bin/python -m pytest bench/ --benchmark-only     # small CPU set, a few minutes
    LOWRANK_BENCH_FULL=1 ...          # the run.py shapes (quick and --full), fp32 and fp64
    LOWRANK_BENCH_MAX_AUTOTUNE=1 ...  # also torch.compile(mode="max-autotune")

Benchmarks are grouped by shape and pass, so pytest-benchmark's table compares the
implementations side by side. The CUDA cases (bf16 B=8192 in=out=4096) are added only where a
GPU is present; each timed call ends in torch.cuda.synchronize() so the wall clock covers the
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
    MAX_AUTOTUNE,
    PASSES,
    QUICK,
    dtype_name,
    grid,
    make_problem,
    make_step,
)
from correctness import Reference, check
from timing import copies_for_cold_cache

import lowrank_ext

FULL_SET = os.environ.get("LOWRANK_BENCH_FULL", "") not in ("", "0")
ALL_IMPLS = IMPLS + ((MAX_AUTOTUNE,) if os.environ.get("LOWRANK_BENCH_MAX_AUTOTUNE") else ())


def _cases():
    """(device, dtype, shape) triples. Default: a small CPU set that runs in a few minutes."""
    if FULL_SET:
        cpu = QUICK["cpu"]["shapes"] + FULL["cpu"]["shapes"]
        cpu_dtypes = ("float32", "float64")
    else:
        cpu = grid([1024], [(2048, 2048)], [16, 128])
        cpu_dtypes = ("float32",)
    cases = [
        ("cpu", torch.float32 if d == "float32" else torch.float64, s)
        for d, s in itertools.product(cpu_dtypes, dict.fromkeys(cpu))
    ]
    if torch.cuda.is_available() and lowrank_ext.build_info()["cuda_kernels"]:
        cuda = (FULL if FULL_SET else QUICK)["cuda"]["shapes"]
        cases += [("cuda", torch.bfloat16, s) for s in cuda]
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
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    counter = itertools.count()

    def timed():
        step(next(counter) % copies)  # rotate the inputs so they are cold in cache
        sync()

    benchmark.group = f"{device} {dtype_name(dtype)} {shape.label()} {pass_}"
    benchmark.extra_info.update(impl=impl, pass_=pass_, copies=copies, **vars(shape))
    # Fixed rounds: one dense fwd+bwd call is seconds on a small CPU; calibration would repeat it.
    rounds = 20 if device == "cuda" else 10
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
