"""What is benchmarked: shapes, dtypes, passes and the implementations under test.

Shared by the pytest-benchmark suite (test_linear_bench.py) and the script (run.py), so both
time exactly the same callables on exactly the same inputs.

Implementations (y = ((x V) Sᵀ) Uᵀ + bias, all holding the same function):

- fused: `lowrank_ext.linear`, the op under test.
- two_linear: what a user writes instead of `LowRankLinear` — two `nn.Linear` layers,
  `F.linear(F.linear(x, A), U, bias)` with the first weight A = (V Sᵀ)ᵀ (V·diag(S) for a diagonal
  core) folded once when the problem is built, a contiguous leaf like an `nn.Linear` weight.
  The bar, with compiled (DESIGN.md, "Performance"; issue 13).
- compiled: `torch.compile` of the unfused formula (`reference.linear`), mode="default".
- dense: `nn.Linear(in, out)` holding W = U S Vᵀ.
- eager: the unfused formula in eager PyTorch, bias added in a separate pass; chained: three
  `F.linear` calls (t = x V, t·S, then U with the bias). Not in the default set: a separate bias
  pass is not what a user writes, chained is two_linear plus a scaling pass, neither is the bar,
  and timing them costs default-run time. `--impls ... eager chained` adds them, shown last.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lowrank_ext
from lowrank_ext import reference

PASSES = ("fwd", "fwd+bwd")
# Order matters only for display: fused first, then the baselines that are the bar, then the rest.
BAR = ("two_linear", "compiled")
DEFAULT_IMPLS = ("fused", *BAR, "dense")
IMPLS = (*DEFAULT_IMPLS, "eager", "chained")
# lowrank_ext.linear with set_cuda_kernels("tensorcore") for its forward: CUDA only, so not in
# IMPLS; run.py adds it to the --device cuda table when the build has it. Its backward is the
# default's.
TENSORCORE = "tensorcore"
MAX_AUTOTUNE = "compiled-max-autotune"  # opt-in: compiling it takes minutes

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Shape:
    batch: int
    in_features: int
    out_features: int
    rank: int
    core: str = "diag"  # "diag": S is (r,); "full": S is (r, r)

    def label(self) -> str:
        core = "" if self.core == "diag" else " core=full"
        return f"B={self.batch} in={self.in_features} out={self.out_features} r={self.rank}{core}"


def grid(batches, features, ranks, core="diag") -> list[Shape]:
    """Cartesian product; features are (in, out) pairs."""
    return [Shape(b, i, o, r, core) for b, (i, o), r in itertools.product(batches, features, ranks)]


# Small-batch rows (issue 13): inference-sized batches, where a call costs microseconds and host
# overhead decides; the same on every device. Large rows: the throughput targets, CPU fp32
# B=4096 in=out=4096, CUDA bf16 B=8192 in=out=4096; --full adds more of them.
SMALL = grid([1, 16, 64], [(768, 768), (768, 3072), (4096, 4096)], [16, 32, 64])
LARGE = {
    "cpu": grid([4096], [(4096, 4096)], [16, 64, 256]),
    "cuda": grid([8192], [(4096, 4096)], [16, 64, 256]),
}
FULL = {
    "cpu": grid([4096], [(4096, 4096)], [8, 16, 32, 64, 128, 256, 512])
    + grid([1024], [(1024, 4096), (4096, 1024)], [16, 64, 256])
    + grid([4096], [(4096, 4096)], [64], core="full"),
    "cuda": grid([8192], [(4096, 4096)], [8, 16, 32, 64, 128, 256, 512])
    + grid([8192], [(8192, 8192)], [16, 64, 256])
    + grid([32768], [(4096, 4096)], [16, 64, 256])
    + grid([8192], [(4096, 4096)], [64], core="full"),
}
PRESETS = ("all", "small", "large")
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16",)}


def preset_shapes(preset: str, device_type: str, full: bool = False) -> list[Shape]:
    """The rows of a preset: "small", the small-batch rows; "large", the large rows (with
    `full`, the longer list); "all", both, small first."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    small = SMALL if preset in ("all", "small") else []
    large = (FULL if full else LARGE)[device_type] if preset in ("all", "large") else []
    return small + large


def is_small(shape: Shape) -> bool:
    """A small-batch row: the batch is no larger than the small preset's largest."""
    return shape.batch <= max(s.batch for s in SMALL)


@dataclass
class Problem:
    """Inputs for one shape: `copies` independent (x, dy) pairs to rotate through, and one set
    of parameters. The dense baseline's weight is U S Vᵀ and two_linear's first weight is
    A = (V Sᵀ)ᵀ, so every implementation computes the same function and one float64 reference
    checks them all."""

    shape: Shape
    xs: list[torch.Tensor]
    dys: list[torch.Tensor]
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    bias: torch.Tensor
    A: torch.Tensor
    dense: torch.nn.Linear

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.U, self.S, self.V, self.bias)


def make_problem(
    shape: Shape, dtype: torch.dtype, device, copies: int = 1, seed: int = 0
) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        # Drawn on the CPU in fp32 (reproducible across devices), then moved and cast.
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    n, m, r = shape.in_features, shape.out_features, shape.rank
    # Orthonormal columns and S ~ 1 keep y at the scale of x, as a trained layer would.
    U = torch.linalg.qr(torch.randn(m, r, generator=g))[0].to(device=device, dtype=dtype)
    V = torch.linalg.qr(torch.randn(n, r, generator=g))[0].to(device=device, dtype=dtype)
    if shape.core == "diag":
        S = (0.5 + torch.rand(r, generator=g)).to(device=device, dtype=dtype)
    else:
        S = torch.eye(r, device=device, dtype=dtype) + randn(r, r, scale=0.1 / r**0.5)
    bias = randn(m, scale=0.1)
    xs = [randn(shape.batch, n).requires_grad_() for _ in range(copies)]
    dys = [randn(shape.batch, m) for _ in range(copies)]
    dense = torch.nn.Linear(n, m, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(reference.dense_weight(U, S, V))
        dense.bias.copy_(bias)
    # two_linear's first weight, (r, in): formed in float64 from the rounded factors and
    # rounded once, as a user folding S into the first nn.Linear would store it.
    Vd, Sd = V.double(), S.double()
    A = (Vd * Sd if shape.core == "diag" else Vd @ Sd.T).T.to(dtype).contiguous()
    for p in (U, S, V, bias, A):
        p.requires_grad_()
    return Problem(shape, xs, dys, U, S, V, bias, A, dense)


_COMPILED: dict[str, object] = {}


def compiled_formula(mode: str):
    """torch.compile of the eager unfused formula, one wrapper per mode.

    dynamic=False: each shape gets its own specialised kernels, as a user with fixed shapes
    would get; the recompile limit is raised so a long shape sweep never falls back to eager.
    """
    if mode not in _COMPILED:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _COMPILED[mode] = torch.compile(reference.linear, mode=mode, dynamic=False, fullgraph=True)
    return _COMPILED[mode]


def tensorcore_linear(*args):
    """lowrank_ext.linear with the tensorcore forward: the process-wide switch is set for this
    call only, through the C functions (two ~0.1 µs calls), so the default column keeps its own
    kernels while the implementations are timed round-robin."""
    from lowrank_ext import ops

    previous = ops._cuda_kernels()
    ops._set_cuda_kernels(TENSORCORE)
    try:
        return lowrank_ext.linear(*args)
    finally:
        ops._set_cuda_kernels(previous)


def forward_fn(impl: str, problem: Problem):
    """(x -> y, {name: parameter} for the parameters whose gradients the backward computes)."""
    p = problem
    if impl == "dense":
        return p.dense, {"weight": p.dense.weight, "bias": p.dense.bias}
    if impl == "two_linear":
        return (lambda x: F.linear(F.linear(x, p.A), p.U, p.bias)), {
            "A": p.A,
            "U": p.U,
            "bias": p.bias,
        }
    formula = {
        "fused": lowrank_ext.linear,
        TENSORCORE: tensorcore_linear,
        "eager": reference.linear,
        "chained": reference.linear_chained,
        "compiled": lambda *a: compiled_formula("default")(*a),
        MAX_AUTOTUNE: lambda *a: compiled_formula("max-autotune")(*a),
    }[impl]
    params = dict(zip(("U", "S", "V", "bias"), p.params, strict=True))
    return (lambda x: formula(x, p.U, p.S, p.V, p.bias)), params


def make_step(impl: str, problem: Problem, pass_: str):
    """A callable step(i) running one pass on input copy i; returns (y, {name: gradient}) for
    the checks ({} for the forward; the names are "x" and forward_fn's parameter names).

    Forward runs under no_grad (inference: nothing is saved for backward). Forward+backward
    takes gradients with autograd.grad, so nothing accumulates into .grad between calls.
    """
    fn, params = forward_fn(impl, problem)
    names, tensors = ("x", *params), tuple(params.values())
    if pass_ == "fwd":

        def step(i: int):
            with torch.no_grad():
                return fn(problem.xs[i]), {}
    elif pass_ == "fwd+bwd":

        def step(i: int):
            x = problem.xs[i]
            y = fn(x)
            grads = torch.autograd.grad(y, (x, *tensors), problem.dys[i])
            return y, dict(zip(names, grads, strict=True))
    else:
        raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")
    return step


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
