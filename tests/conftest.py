"""Shared test settings: devices, tolerances and hypothesis profiles."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("LOWRANK_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; none is present")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

# dtypes each backend's kernel supports, with (rtol, atol) against a float64 reference whose
# inputs are O(1) and whose factors are scaled so outputs are O(1).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (4e-2, 8e-2),
}
DTYPES = {
    "cpu": [torch.float32, torch.float64],
    "cuda": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
}


@pytest.fixture(autouse=True)
def _no_tf32():
    # The float32 checks compare against float64; TF32 matmuls in the reference would not.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture
def one_thread():
    # For suites of tiny problems: thread-pool wake-ups cost more than the work, and on a
    # shared 2-core machine far more.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
