"""Checks of the benchmark's own machinery (not benchmarks): timing, floor bytes, the two_linear
baseline and the report, on CPU in seconds. The CUDA branch of timing.measure runs here with
fake events, so its bookkeeping is exercised on a machine without a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from bandwidth import floor_bytes
from cases import Shape, make_problem, make_step, preset_shapes
from correctness import Reference, check
from report import summary, summary_lines, table
from timing import calls_per_sample, copies_for_cold_cache, measure


def _sleeper(seconds: float, calls: list):
    def step(i: int):
        calls.append(i)
        time.sleep(seconds)

    return step


def test_calls_per_sample_reaches_the_target():
    calls = []
    k = calls_per_sample(_sleeper(2e-4, calls), torch.device("cpu"), target_s=2e-3)
    assert 5 <= k <= 20
    assert calls_per_sample(_sleeper(3e-3, []), torch.device("cpu"), target_s=2e-3) == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_measure_loops_rotates_and_reports_per_call(monkeypatch, device):
    if device == "cuda":  # fake events on the host clock: only the bookkeeping is under test

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = time.perf_counter()

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    seen = {"a": [], "b": []}
    steps = {"a": _sleeper(1e-4, seen["a"]), "b": _sleeper(1e-4, seen["b"])}
    times = measure(steps, 3, torch.device(device), 1, 4, calls={"a": 5})
    assert len(seen["a"]) == 5 * 5 and len(seen["b"]) == 5  # (warmup + repeats) × calls
    assert set(seen["a"]) == {0, 1, 2}  # copies rotate call by call
    assert [len(t) for t in times.values()] == [4, 4]
    for t in times.values():  # per call, not per sample
        assert all(1e-4 <= s < 5e-3 for s in t)


def test_copies_for_cold_cache():
    cpu = torch.device("cpu")
    assert copies_for_cold_cache(4 * 64 * (4096 + 4096), cpu) == 1  # small: warm whatever
    assert copies_for_cold_cache(4 * 4096 * (4096 + 4096), cpu) >= 2


def test_floor_bytes_counts_the_factors():
    s = Shape(1, 768, 3072, 32)
    factors = 3072 * 32 + 32 + 768 * 32 + 3072
    assert floor_bytes(s, torch.float32, "fwd") == 4 * (768 + 3072 + factors)
    bwd = 3072 + 768 + 768 + 2 * factors
    assert floor_bytes(s, torch.float32, "fwd+bwd") == 4 * (768 + 3072 + factors + bwd)
    full = Shape(1, 768, 3072, 32, core="full")
    assert floor_bytes(full, torch.float32, "fwd") - floor_bytes(s, torch.float32, "fwd") == 4 * (
        32 * 32 - 32
    )


@pytest.mark.parametrize("core", ["diag", "full"])
def test_two_linear_matches_the_reference(core):
    problem = make_problem(Shape(5, 24, 40, 3, core), torch.float64, torch.device("cpu"))
    ref = Reference(problem)
    for pass_ in ("fwd", "fwd+bwd"):
        y, grads = make_step("two_linear", problem, pass_)(0)
        check("two_linear", pass_, problem, ref, (y, grads))
    assert set(grads) == {"x", "A", "U", "bias"}
    assert problem.A.is_leaf and problem.A.is_contiguous() and problem.A.shape == (3, 24)


def test_presets_and_report():
    small = preset_shapes("small", "cpu")
    assert len(small) == 27 and {s.batch for s in small} == {1, 16, 64}
    assert preset_shapes("all", "cuda") == small + preset_shapes("large", "cuda")
    common = dict(batch=1, in_features=8, out_features=8, rank=2, core="diag", dtype="float32")
    records = [
        {**common, "pass": "fwd", "row_class": "small", "impl": impl, "median_s": t, "ratio": r}
        for impl, t, r in [("fused", 2e-5, None), ("two_linear", 3e-5, 1.5), ("dense", 2e-3, 100)]
    ]
    text = table(records, ["fused", "two_linear", "dense"])
    assert "20.0 µs" in text and "30.0 µs (1.50×)" in text and "2.00 ms (100.00×)" in text
    entries = summary(records, ("two_linear", "compiled"))
    assert entries == [
        {
            "row_class": "small",
            "pass": "fwd",
            "rows": 1,
            "vs": {"two_linear": {"min": 1.5, "median": 1.5}},
        }
    ]
    assert summary_lines(entries) == [
        "fwd, small rows (1): fused vs two_linear min 1.50× median 1.50×"
    ]
