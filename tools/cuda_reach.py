#!/usr/bin/env python3
"""Reach every CUDA kernel of lowrank_ext once, with tiny shapes, against a float64 reference.

    python tools/cuda_reach.py                  # every case on the GPU; exit 1 on any mismatch
    python tools/cuda_reach.py --list           # the cases and the SIMT tile map; needs no GPU
    python tools/cuda_reach.py --quick --no-profile     # the set tools/gpu_check.py runs under
                                                        # compute-sanitizer
    python tools/cuda_reach.py --cases 'fused/float16'  # only the cases whose name matches

The cases: the CUDA backends of lowrank_ext.linear ("cublas", the default cuBLAS composition,
"fused", the SIMT kernels, and "tensorcore", the mma.sync forward of linear_tensorcore.cu when the
build has it: every padded rank 32/64/128/256 it instantiates, its 16-byte cp.async and its
element-by-element tile loads, small batches split over output columns, several output tiles per
block), forward and backward (every gradient, and only some: the output
mask), diagonal and full core, with and without bias, float32, bfloat16, float16 and float64,
batches of 0, 1, odd sizes and leading dims, every tile height the SIMT kernels pick (64, 16, 4
and 1 rows, under the 96 KiB soft budget and above it) and their at::mm fallback, the raw
linear_forward(save_t=False) + linear_backward(t empty) pair, and project_out (1 and 2 passes,
normalize or not, an empty basis, forward and backward). Every result is compared with plain
PyTorch in float64 on the CPU (lowrank_ext.reference). An output element nobody wrote fails the
check: before each case the caching allocator is poisoned with NaN, and during it torch fills
every tensor empty() makes with NaN (deterministic algorithms, warn_only). Neither is done when
PYTORCH_NO_CUDA_MEMORY_CACHING=1, as under compute-sanitizer, where initcheck does that job.

Unless --no-profile, the fused backend's tile cases also run under torch.profiler, and the names
of the kernels that ran are checked against the tile height this file predicts (a different tile
height is an error; names that cannot be read are a warning); so do the tensorcore cases, whose
forward kernel must run exactly where tensorcore_takes says (float16/bfloat16, 1 <= r <= 256,
out > 0, batch > 0) and its backward's first pass where, in addition, g = dy U is needed.

The tile map below ports pick_tile_rows/tile_smem_elems of csrc/cuda/linear.cu: keep them in step.
Only the standard library is imported at module level, so --list and the tile map work anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

# ---- the SIMT tile map (csrc/cuda/linear.cu) -----------------------------------------------------

THREADS = 256
TILE_ROWS = (64, 16, 4, 1)  # the BM values pick_tile_rows tries, in order
SOFT_SMEM_BYTES = 96 * 1024  # the budget under which two blocks share an SM
FALLBACK = 0  # pick_tile_rows's answer when not even one row fits: at::mm chains

# cudaDevAttrMaxSharedMemoryPerBlockOptin by compute capability, for a torch whose device
# properties lack shared_memory_per_block_optin (added to torch before 2.11; kept as a fallback).
OPTIN_SMEM_BY_CAPABILITY = {
    (8, 0): 166912,  # A100: 163 KiB
    (8, 6): 101376,  # 99 KiB
    (8, 7): 166912,
    (8, 9): 101376,
    (9, 0): 232448,  # H100, H200: 227 KiB
    (10, 0): 232448,
    (12, 0): 101376,
}
SM90_OPTIN_SMEM = OPTIN_SMEM_BY_CAPABILITY[(9, 0)]
SM80_OPTIN_SMEM = OPTIN_SMEM_BY_CAPABILITY[(8, 0)]
ACC_BYTES = {"float32": 4, "bfloat16": 4, "float16": 4, "float64": 8}  # at::opmath_type


def round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def tile_config(bm: int) -> tuple[int, int, int]:
    """(BK, XS, MS) of TileConfig<BM>: the k-chunk and the padded strides of Xs and Ms."""
    ty = bm if bm < 16 else 16
    tx = THREADS // ty
    rc = tx * 4  # CN = 4 columns per thread
    bk = 32 if rc <= 256 else 8192 // rc
    return bk, bk + 1, rc + 1


def tile_smem_elems(bm: int, r: int) -> int:
    """Shared-memory elements (acc type) of one BM-row tile at rank r: T, Xs and Ms."""
    bk, xs, ms = tile_config(bm)
    return bm * (round_up(r, bk) + 1) + bm * xs + bk * ms


def tile_smem_bytes(bm: int, r: int, acc_bytes: int) -> int:
    return tile_smem_elems(bm, r) * acc_bytes


def pick_tile_rows(r: int, acc_bytes: int, optin_smem: int) -> int:
    """The largest BM whose tile fits the soft budget, else the largest that fits the opt-in
    maximum, else 0 (the at::mm fallback)."""
    soft = min(SOFT_SMEM_BYTES, optin_smem)
    for limit in (soft, optin_smem):
        for bm in TILE_ROWS:
            if tile_smem_bytes(bm, r, acc_bytes) <= limit:
                return bm
    return FALLBACK


@dataclasses.dataclass(frozen=True)
class Segment:
    """Ranks lo..hi (hi None: every larger rank) take tile height bm; over_soft: their tile is
    larger than the 96 KiB soft budget (launched with the opt-in shared-memory attribute)."""

    bm: int
    over_soft: bool
    lo: int
    hi: int | None


def tile_segments(acc_bytes: int, optin_smem: int) -> list[Segment]:
    """Every path of pick_tile_rows as contiguous rank ranges, in increasing rank order.

    Tile sizes depend on r only through round_up(r, 8) and round_up(r, 32), so the answer is
    constant on (8j - 8, 8j]: one evaluation per bucket of 8 is exact. Not monotone in general
    (float64 on sm_90 goes 64, 16, 4, 1, then 4 again above the soft budget, then 1, then 0).
    """
    soft = min(SOFT_SMEM_BYTES, optin_smem)
    segments: list[Segment] = []
    j = 1
    while True:
        r = 8 * j
        bm = pick_tile_rows(r, acc_bytes, optin_smem)
        over = bm != FALLBACK and tile_smem_bytes(bm, r, acc_bytes) > soft
        if segments and (segments[-1].bm, segments[-1].over_soft) == (bm, over):
            segments[-1] = dataclasses.replace(segments[-1], hi=r)
        else:
            segments.append(Segment(bm, over, r - 7, r))
        if bm == FALLBACK:  # one row of t no longer fits, nor will it at any larger rank
            segments[-1] = dataclasses.replace(segments[-1], hi=None)
            return segments
        j += 1


def describe_segments(acc_bytes: int, optin_smem: int) -> list[str]:
    lines = []
    for s in tile_segments(acc_bytes, optin_smem):
        span = f"r {s.lo}..{s.hi}" if s.hi is not None else f"r >= {s.lo}"
        if s.bm == FALLBACK:
            lines.append(f"  {span:<18} at::mm fallback (no tile fits)")
        else:
            top = s.hi if s.hi is not None else s.lo
            kib = tile_smem_bytes(s.bm, top, acc_bytes) / 1024
            budget = "over the 96 KiB soft budget" if s.over_soft else "within 96 KiB"
            lines.append(f"  {span:<18} BM={s.bm:<3} up to {kib:6.1f} KiB, {budget}")
    return lines


def tile_map_text(optin_smem: int, label: str) -> str:
    out = [f"SIMT tile map, opt-in shared memory {optin_smem} bytes ({label}):"]
    for dtype, acc in (("float32/bfloat16/float16", 4), ("float64", 8)):
        out.append(f" {dtype} (accumulator {acc} bytes):")
        out += describe_segments(acc, optin_smem)
    issue = ", ".join(f"{r}->{pick_tile_rows(r, 4, optin_smem)}" for r in ISSUE_RANKS)
    out.append(f" issue 13's fp32 ranks -> BM (0: fallback): {issue}")
    return "\n".join(out)


# The float32 ranks issue 13 suggests for the tile heights. On sm_90 they give BM 16, 4, 1, 1:
# neither BM=64 nor the fallback, which is why the reach and the tests add rank_for_path's ranks.
ISSUE_RANKS = (300, 1400, 4100, 20000)


def representative_ranks(acc_bytes: int, optin_smem: int) -> list[int]:
    """One rank per path: the largest of each segment (its tile uses the most shared memory of
    that path: an overrun shows), and the smallest rank of the fallback."""
    return [s.lo if s.hi is None else s.hi for s in tile_segments(acc_bytes, optin_smem)]


def fallback_rank(acc_bytes: int, optin_smem: int) -> int:
    return tile_segments(acc_bytes, optin_smem)[-1].lo


def device_optin_smem(torch, device=None) -> tuple[int, str]:
    """The device's opt-in shared memory per block, and where the number came from."""
    props = torch.cuda.get_device_properties(device if device is not None else 0)
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value), "torch.cuda.get_device_properties"
    cap = (props.major, props.minor)
    if cap in OPTIN_SMEM_BY_CAPABILITY:
        return OPTIN_SMEM_BY_CAPABILITY[cap], f"table for sm_{cap[0]}{cap[1]} (torch lacks it)"
    raise RuntimeError(
        f"the opt-in shared memory of sm_{cap[0]}{cap[1]} is unknown: torch's device properties "
        "lack shared_memory_per_block_optin; add the device to OPTIN_SMEM_BY_CAPABILITY"
    )


# ---- the cases -----------------------------------------------------------------------------------

BACKENDS = ("cublas", "fused", "tensorcore")
TILE_BACKENDS = ("cublas", "fused")  # the sets with tile and variant cases (every dtype and rank)
# csrc/cuda/linear_tensorcore.cu: the largest rank it takes (kTensorcoreMaxRank) and its kernel.
TENSORCORE_MAX_RANK = 256
TENSORCORE_KERNEL = "linear_forward_tc_kernel"
TENSORCORE_GRAD_KERNEL = "linear_grad_g_tc_kernel"  # the backward's first pass: g = dy U, dbias
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
GRAD_NAMES = ("x", "U", "S", "V", "bias")
# Largest rank at which a full (r x r) core is used: S stays under ~70 MB in float32.
FULL_CORE_MAX_RANK = 4100
# max |got - ref| / max |ref| allowed, before the sqrt(reduction length / 256) growth.
BASE_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


@dataclasses.dataclass(frozen=True)
class LinearCase:
    backend: str
    dtype: str
    batch: tuple[int, ...]
    n: int
    m: int
    r: int
    core: str = "diag"
    bias: bool = True
    grads: tuple[str, ...] = GRAD_NAMES  # () runs the forward alone under no_grad
    raw: bool = False  # linear_forward(save_t=False) + linear_backward(t empty), called directly
    # Tile cases only: the tile height the fused kernels pick at this rank on this device (the
    # profiler then checks the kernels that ran: that BM for "fused", no tile kernel for "cublas").
    bm: int | None = None

    @property
    def name(self) -> str:
        batch = "x".join(map(str, self.batch))
        grads = [g for g in self.grads if g != "bias" or self.bias]
        grads = "+".join(grads) if grads else "none"
        kind = "raw" if self.raw else "op"
        tile = "" if self.bm is None else f"/BM{self.bm}"
        return (
            f"linear/{self.backend}/{self.dtype}/B{batch}/n{self.n}m{self.m}r{self.r}/{self.core}"
            f"/{'bias' if self.bias else 'nobias'}/{kind}:{grads}{tile}"
        )


@dataclasses.dataclass(frozen=True)
class ProjectOutCase:
    dtype: str
    n: int
    k: int
    p: int
    passes: int
    normalize: bool
    grads: tuple[str, ...] = ("Q", "X")

    @property
    def name(self) -> str:
        grads = "+".join(self.grads) if self.grads else "none"
        return (
            f"project_out/{self.dtype}/n{self.n}k{self.k}p{self.p}/passes{self.passes}"
            f"/{'normalize' if self.normalize else 'plain'}/grads:{grads}"
        )


def tile_cases(backends, optin_smem: int, quick: bool, lowest: bool = False) -> list[LinearCase]:
    """Every path of pick_tile_rows for every dtype: diagonal core at each segment's largest rank
    (float32 also at issue 13's ranks), full core at the lowest rank of each tile height.

    quick (memcheck's and synccheck's set) leaves out issue 13's ranks and, but for float32, the
    BM=1 tiles over the soft budget: the same kernels as at lower ranks.

    lowest (with quick: racecheck's and initcheck's set) is sized for tools ~10x slower than
    memcheck, whose cost grows with rows x rank (on the H200, 2026-11-30, racecheck took 15 s for
    float32 BM=1 at r=4033 and 57 s at r=16361): float32 at the lowest rank of each tile height
    within the soft budget (full core at BM=64 and 16), the other dtypes at BM=64 only. The
    templates differ by dtype in their loads and accumulator, not in their barriers.
    """
    cases = []
    for dtype in DTYPE_NAMES:
        acc = ACC_BYTES[dtype]
        segments = tile_segments(acc, optin_smem)
        if lowest:
            keep = [s for s in segments if s.hi is None or not s.over_soft]
            if dtype != "float32":
                keep = [s for s in keep if s.bm == 64]
            diag = [s.lo for s in keep]
            full = [s.lo for s in keep if s.bm in (64, 16)]
        else:
            diag = [
                s.lo if s.hi is None else s.hi
                for s in segments
                if not (quick and dtype != "float32" and s.bm == 1 and s.over_soft)
            ]
            if dtype == "float32" and not quick:
                diag = sorted(set(diag) | set(ISSUE_RANKS))
            # Full core at the lowest rank of each tile height (r = 1 included): the tiles'
            # shared memory is the diagonal cases' at the same rank, and an r x r core stays cheap.
            full = []
            for bm in TILE_ROWS:
                seg = next((s for s in segments if s.bm == bm), None)
                if seg is not None:
                    full.append(min(seg.lo, FULL_CORE_MAX_RANK))
        for backend in backends:
            if backend == "tensorcore":
                continue  # its own cases: tensorcore_cases
            if quick and backend != "fused" and dtype != "float32":
                continue  # the composition does not depend on the rank's tile height
            for core, ranks in (("diag", diag), ("full", full)):
                for r in ranks:
                    bm = pick_tile_rows(r, acc, optin_smem)
                    cases.append(tile_case(backend, dtype, r, core, bm))
    return cases


# Rows per tile case: three tiles of the case's height, the last one partial (64 + 3 rows for
# BM=64; two one-row tiles for BM=1). More would only repeat them, at a cost under racecheck
# that grows with rows x rank.
TILE_CASE_ROWS = {64: 67, 16: 35, 4: 11, 1: 2, FALLBACK: 3}


def tile_case(backend: str, dtype: str, r: int, core: str, bm: int) -> LinearCase:
    """The case of rank r whose fused kernels take tile height bm: 40 inputs, and 70 outputs
    (more than one 64-column chunk) unless r is large."""
    out = 70 if r <= FULL_CORE_MAX_RANK else 12
    return LinearCase(backend, dtype, (TILE_CASE_ROWS[bm],), 40, out, r, core=core, bm=bm)


def variant_cases(backends, quick: bool) -> list[LinearCase]:
    """Small rank (BM=64): every dtype x core x bias, batches 0/1/odd/leading dims, masks."""
    cases = []
    for backend in backends:
        if backend == "tensorcore":
            continue  # its own cases: tensorcore_cases
        for dtype in DTYPE_NAMES:
            for core in ("diag", "full"):
                for bias in (True, False):
                    if quick and not bias and dtype != "float32":
                        continue
                    cases.append(LinearCase(backend, dtype, (67,), 45, 77, 17, core, bias))
        for core in ("diag", "full"):
            for batch in ((0,), (1,), (2, 5), (129,)):
                cases.append(LinearCase(backend, "float32", batch, 33, 65, 5, core))
            cases.append(LinearCase(backend, "float32", (37,), 50, 30, 3, core, grads=()))
        mask_dtypes = ("float32",) if quick else ("float32", "bfloat16")
        for dtype in mask_dtypes:
            for core in ("diag",) if quick else ("diag", "full"):
                for grads in (("x",), ("U",), ("S",), ("V",), ("bias",), ("U", "S"), ("x", "V")):
                    cases.append(LinearCase(backend, dtype, (41,), 36, 20, 7, core, grads=grads))
                for grads in (GRAD_NAMES, ("U",), ("S",), ("U", "S"), ("x", "V", "bias")):
                    cases.append(
                        LinearCase(backend, dtype, (41,), 36, 20, 7, core, grads=grads, raw=True)
                    )
    return cases


def tensorcore_takes(case: LinearCase) -> bool:
    """Whether the tensorcore kernel runs this case's forward (else the composition does)."""
    batch = math.prod(case.batch)
    return (
        case.dtype in ("float16", "bfloat16")
        and 1 <= case.r <= TENSORCORE_MAX_RANK
        and case.m > 0
        and batch > 0
    )


def tensorcore_grad_runs(case: LinearCase) -> bool:
    """Whether the backward's first pass runs on the tensorcore kernel: taken, and g = dy U is
    needed (for dx, dV or dS; dbias alone is a column sum on the composition)."""
    return tensorcore_takes(case) and bool({"x", "V", "S"} & set(case.grads))


def tensorcore_cases(backends, quick: bool, lowest: bool = False) -> list[LinearCase]:
    """The tensorcore forward (its backward is the composition's): each padded rank (32, 64, 128,
    256) with 16-byte loads (in % 8 == r % 8 == 0) and element loads (odd in or r), bf16 and fp16,
    diagonal and full core, bias or not, batches of 0, 1 and leading dims, 2 row blocks with the
    last partial, output columns split over blocks (small batch) and several output tiles per
    block (>= 132 row blocks), the float32 and r > 256 fallbacks, no_grad and the raw ops."""
    if "tensorcore" not in backends:
        return []
    tc = "tensorcore"
    cases = []
    # lowest (racecheck's and initcheck's set): bfloat16 only; float16 differs in the mma
    # instruction, not in its loads or barriers.
    for dtype in ("bfloat16",) if lowest else ("bfloat16", "float16"):
        for core in ("diag", "full"):
            for bias in (True, False):
                if (quick and not bias and core == "full") or (lowest and not bias):
                    continue
                cases.append(LinearCase(tc, dtype, (67,), 48, 77, 16, core, bias))  # RP 32, 16 B
                cases.append(LinearCase(tc, dtype, (67,), 45, 77, 17, core, bias))  # RP 32, elems
        for n, m, r, batch in (
            (64, 130, 40, (3,)),  # RP 64, 2 output tiles split over 2 blocks
            (50, 70, 100, (2, 5)),  # RP 128, element loads, leading dims
            (32, 20, 256, (65,)),  # RP 256, the largest rank taken
            (48, 77, 16, (0,)),  # empty batch
            (40, 300, 24, (1,)),  # one row: three output tiles, each its own block
        ):
            cases.append(LinearCase(tc, dtype, batch, n, m, r))
        cases.append(LinearCase(tc, dtype, (37,), 48, 30, 8, grads=()))  # no_grad: t not saved
        cases.append(LinearCase(tc, dtype, (41,), 36, 20, 7, raw=True))
        if not lowest:
            # 133 row blocks (> the SMs of an H200): no split, 3 output tiles per block.
            cases.append(LinearCase(tc, dtype, (8500,), 16, 260, 8, bias=True))
    # What it does not take runs the composition: float32, r > 256.
    cases.append(LinearCase(tc, "float32", (67,), 48, 77, 16))
    cases.append(LinearCase(tc, "bfloat16", (5,), 40, 30, TENSORCORE_MAX_RANK + 1))
    return cases


def project_out_cases(quick: bool) -> list[ProjectOutCase]:
    cases = []
    for dtype in ("float32", "float64"):
        for passes in (1, 2):
            for normalize in (False, True):
                if normalize and passes < 2:
                    continue  # refused: normalize needs two passes
                for k in (0, 5):
                    cases.append(ProjectOutCase(dtype, 300, k, 3, passes, normalize))
    for grads in (("Q",), ("X",), ()):
        cases.append(ProjectOutCase("float32", 300, 5, 3, 2, True, grads))
    if not quick:
        cases.append(ProjectOutCase("float64", 1031, 70, 4, 2, True))  # many row parts
    return cases


def all_cases(backends, optin_smem: int, quick: bool, lowest: bool = False) -> list:
    return (
        tile_cases(backends, optin_smem, quick, lowest)
        + variant_cases(backends, quick)
        + tensorcore_cases(backends, quick, lowest)
        + project_out_cases(quick)
    )


# ---- running a case (needs torch and a GPU) ------------------------------------------------------


class Mismatch(AssertionError):
    pass


def tolerance(dtype: str, reduction: int) -> float:
    return BASE_TOLERANCE[dtype] * max(1.0, math.sqrt(reduction / 256))


def compare(what: str, got, ref, dtype: str, reduction: int) -> float:
    """Raise Mismatch unless got (any dtype, CUDA) matches ref (float64, CPU); return the error
    relative to max |ref|."""
    if ref is None or got is None:
        if (ref is None) != (got is None):
            raise Mismatch(f"{what}: expected {'no' if ref is None else 'a'} result")
        return 0.0
    if tuple(got.shape) != tuple(ref.shape):
        raise Mismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    g = got.detach().double().cpu()
    if not g.isfinite().all():
        bad = (~g.isfinite()).sum().item()
        raise Mismatch(f"{what}: {bad} of {g.numel()} elements are not finite (unwritten?)")
    scale = max(ref.abs().max().item(), 1e-12)
    err = (g - ref).abs().max().item() / scale
    tol = tolerance(dtype, reduction)
    if not err <= tol:
        raise Mismatch(f"{what}: max error {err:.3g} of max |ref|, tolerance {tol:.3g}")
    return err


class Runner:
    def __init__(self, torch, lowrank_ext, seed, *, device="cuda", poison=True, profile=True):
        self.torch = torch
        self.device = device
        self.lowrank_ext = lowrank_ext
        self.seed = seed
        self.poison = poison
        self.profile = profile
        self.kernels: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self.profiler_works: bool | None = None

    # -- helpers

    def dtype(self, name):
        return getattr(self.torch, name)

    def randn(self, *shape, scale=1.0, gen):
        return self.torch.randn(*shape, dtype=self.torch.float64, generator=gen) * scale

    def on_device(self, t64, dtype):
        """The tensor as the kernel sees it (rounded to dtype) and its float64 CPU copy."""
        dev = t64.to(self.device, self.dtype(dtype))
        return dev, dev.detach().double().cpu()

    def poison_cache(self):
        # Freed blocks back the next large outputs: an element the kernel forgets reads as NaN.
        if self.poison and self.device == "cuda":
            self.torch.empty(1 << 26, dtype=self.torch.uint8, device="cuda").fill_(0xFF)
            self.sync()

    @contextlib.contextmanager
    def nan_filled_empties(self):
        """While deterministic algorithms are on, torch fills every tensor that empty() makes
        with NaN (at::empty in the kernels' C++ too), whichever pool it comes from: an output
        element nobody writes then fails the check. warn_only: no op is refused for it."""
        torch = self.torch
        if not self.poison:
            yield
            return
        enabled = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def backend_context(self, backend: str):
        if backend == "default":
            return contextlib.nullcontext()
        return self.lowrank_ext.use_cuda_kernels(backend)

    def check_backend_selected(self, backend: str):
        if backend == "default":
            return
        current = self.lowrank_ext.cuda_kernels()
        info = self.lowrank_ext.build_info().get("cuda_backend", backend)
        if current != backend or info != backend:
            raise Mismatch(
                f"use_cuda_kernels({backend!r}) left cuda_kernels()={current!r}, "
                f"build_info()['cuda_backend']={info!r}"
            )

    # -- linear

    def run_linear(self, case: LinearCase) -> float:
        torch = self.torch
        gen = torch.Generator().manual_seed(self.seed)
        B = math.prod(case.batch)
        x64 = self.randn(*case.batch, case.n, gen=gen)
        U64 = self.randn(case.m, case.r, scale=case.r**-0.5, gen=gen)
        V64 = self.randn(case.n, case.r, scale=max(case.n, 1) ** -0.5, gen=gen)
        S64 = (
            self.randn(case.r, gen=gen)
            if case.core == "diag"
            else self.randn(case.r, case.r, scale=case.r**-0.5, gen=gen)
        )
        b64 = self.randn(case.m, gen=gen) if case.bias else None
        dy64 = self.randn(*case.batch, case.m, gen=gen)
        names = ("x", "U", "S", "V", "bias")
        pairs = [None if t is None else self.on_device(t, case.dtype) for t in (x64, U64, S64, V64)]
        pairs.append(None if b64 is None else self.on_device(b64, case.dtype))
        dy, dy_ref = self.on_device(dy64, case.dtype)
        dev = {n: None if p is None else p[0] for n, p in zip(names, pairs)}
        ref = {n: None if p is None else p[1] for n, p in zip(names, pairs)}
        wanted = [n for n in case.grads if dev[n] is not None]

        self.poison_cache()
        with self.backend_context(case.backend), self.nan_filled_empties():
            self.check_backend_selected(case.backend)
            got = self.profiled(case, lambda: self.linear_on_gpu(case, dev, dy, wanted))

        reduction = max(case.n, case.m, case.r, B)
        want = self.linear_reference(case, ref, dy_ref, wanted)
        errs = [compare(f"{case.name}: y", got["y"], want["y"], case.dtype, reduction)]
        if "t" in got:
            errs.append(compare(f"{case.name}: t", got["t"], want["t"], case.dtype, reduction))
        for n in names:
            expected = want["grads"].get(n)
            errs.append(
                compare(
                    f"{case.name}: grad {n}", got["grads"].get(n), expected, case.dtype, reduction
                )
            )
        return max(errs)

    def linear_on_gpu(self, case: LinearCase, dev, dy, wanted) -> dict:
        torch, ops = self.torch, self.torch.ops.lowrank_ext
        args = [dev[n] for n in ("x", "U", "S", "V", "bias")]
        if case.raw:
            y, t_empty = ops.linear_forward(*args, False)
            if t_empty.numel() != 0:
                raise Mismatch(f"{case.name}: linear_forward(save_t=False) returned a t")
            _, t = ops.linear_forward(*args, True)
            mask = [n in wanted for n in ("x", "U", "S", "V", "bias")]
            grads = ops.linear_backward(dy, args[0], t_empty, args[1], args[2], args[3], mask)
            self.sync()
            named = {n: g for n, g, m in zip(("x", "U", "S", "V", "bias"), grads, mask) if m}
            return {"y": y, "t": t, "grads": named}
        if not wanted:
            with torch.no_grad():
                y = self.lowrank_ext.linear(*args)
            self.sync()
            return {"y": y, "grads": {}}
        leaves = [
            None if a is None else a.detach().requires_grad_(n in wanted)
            for n, a in zip(("x", "U", "S", "V", "bias"), args)
        ]
        y = self.lowrank_ext.linear(*leaves)
        y.backward(dy)
        self.sync()
        grads = {
            n: leaf.grad
            for n, leaf in zip(("x", "U", "S", "V", "bias"), leaves)
            if leaf is not None and leaf.grad is not None
        }
        unexpected = set(grads) - set(wanted)
        if unexpected:
            raise Mismatch(f"{case.name}: gradients nobody asked for: {sorted(unexpected)}")
        return {"y": y.detach(), "grads": grads}

    def linear_reference(self, case: LinearCase, ref, dy_ref, wanted) -> dict:
        torch = self.torch
        reference = self.lowrank_ext.reference
        leaves = {
            n: None if t is None else t.clone().requires_grad_(n in wanted) for n, t in ref.items()
        }
        with torch.enable_grad():
            y = reference.linear(leaves["x"], leaves["U"], leaves["S"], leaves["V"], leaves["bias"])
            grads = {}
            if wanted:
                inputs = [leaves[n] for n in wanted]
                grads = dict(zip(wanted, torch.autograd.grad(y, inputs, dy_ref, allow_unused=True)))
        B = math.prod(case.batch)
        t = ref["x"].reshape(B, case.n) @ ref["V"]
        return {"y": y.detach(), "t": t, "grads": grads}

    # -- project_out

    def run_project_out(self, case: ProjectOutCase) -> float:
        torch = self.torch
        gen = torch.Generator().manual_seed(self.seed)
        q, _ = torch.linalg.qr(self.randn(case.n, case.k + case.p, gen=gen))
        Q64 = q[:, : case.k].contiguous()
        X64 = self.randn(case.n, case.p, gen=gen)
        dY64 = self.randn(case.n, case.p, gen=gen)
        (Q, Q_ref), (X, X_ref), (dY, dY_ref) = (
            self.on_device(t, case.dtype) for t in (Q64, X64, dY64)
        )
        self.poison_cache()
        args = (case.passes, case.normalize)
        leaves = {
            "Q": Q.requires_grad_("Q" in case.grads),
            "X": X.requires_grad_("X" in case.grads),
        }
        with self.nan_filled_empties():
            if case.grads:
                Y = self.lowrank_ext.project_out(leaves["Q"], leaves["X"], *args)
                Y.backward(dY)
            else:
                with torch.no_grad():
                    Y = self.lowrank_ext.project_out(Q, X, *args)
            self.sync()

        ref_leaves = {
            "Q": Q_ref.clone().requires_grad_("Q" in case.grads),
            "X": X_ref.clone().requires_grad_("X" in case.grads),
        }
        with torch.enable_grad():
            Y_ref = self.lowrank_ext.reference.project_out(ref_leaves["Q"], ref_leaves["X"], *args)
            want = {}
            if case.grads:
                inputs = [ref_leaves[n] for n in case.grads]
                want = dict(zip(case.grads, torch.autograd.grad(Y_ref, inputs, dY_ref)))
        errs = [compare(f"{case.name}: Y", Y, Y_ref.detach(), case.dtype, case.n)]
        for n in ("Q", "X"):
            errs.append(
                compare(f"{case.name}: grad {n}", leaves[n].grad, want.get(n), case.dtype, case.n)
            )
        return max(errs)

    # -- kernel names

    def profiled(self, case: LinearCase, fn):
        """fn(), and for tile cases the names of the CUDA kernels it ran, checked."""
        if (
            not self.profile
            or self.device != "cuda"
            or (case.bm is None and case.backend != "tensorcore")
            or self.profiler_works is False
            # one dtype shows enough of the tile map
            or (case.backend == "cublas" and case.dtype != "float32")
        ):
            return fn()
        try:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
        except Exception as exc:
            self.profiler_failed(exc)
            return fn()
        names = None
        try:
            result = fn()
        finally:
            try:
                prof.stop()
                names = [
                    e.name
                    for e in prof.events()
                    if str(getattr(e, "device_type", "")).endswith("CUDA")
                ]
            except Exception as exc:
                self.profiler_failed(exc)
        if names is not None:
            self.kernels[case.name] = sorted(set(names))
            self.check_kernel_names(case, names)
        return result

    def profiler_failed(self, exc):
        if self.profiler_works is not False:
            self.warnings.append(f"torch.profiler failed ({exc!r}): kernel names unchecked")
        self.profiler_works = False

    def check_kernel_names(self, case: LinearCase, names: list[str]):
        if not names:
            if self.profiler_works is None:
                self.warnings.append("torch.profiler recorded no CUDA kernel: names unchecked")
            self.profiler_works = False
            return
        self.profiler_works = True
        if case.backend not in BACKENDS:  # no switch: which kernels ran is not known
            return
        tile = [n for n in names if SIMT_TILE_KERNEL.search(n)]
        if case.backend == "tensorcore":
            for kernel, expected in (
                (TENSORCORE_KERNEL, tensorcore_takes(case)),
                (TENSORCORE_GRAD_KERNEL, tensorcore_grad_runs(case)),
            ):
                ran = any(kernel in n for n in names)
                if ran != expected:
                    raise Mismatch(
                        f"{case.name}: {kernel} {'ran' if ran else 'did not run'}; "
                        f"expected {'it' if expected else 'no run'}"
                    )
            if tile:
                raise Mismatch(f"{case.name}: the tensorcore set ran SIMT tile kernels: {tile[:2]}")
            return
        if case.backend == "cublas":
            if tile:
                raise Mismatch(f"{case.name}: the cuBLAS backend ran SIMT tile kernels: {tile[:2]}")
            return
        forward = [n for n in tile if "forward" in n]
        if case.bm == FALLBACK:
            if forward:
                raise Mismatch(f"{case.name}: expected the at::mm fallback, ran {forward[:1]}")
            return
        if not any("lowrank_ext" in n for n in names):
            raise Mismatch(f"{case.name}: the fused backend ran no lowrank_ext kernel")
        heights = {int(h) for n in forward for h in TILE_HEIGHT.findall(n)}
        if not forward or not heights:
            self.warnings.append(f"{case.name}: no forward tile kernel name to read BM from")
        elif case.bm not in heights:
            raise Mismatch(f"{case.name}: predicted BM={case.bm}, the kernels ran BM={heights}")


# linear_forward_kernel<float, float, 64>, linear_grad_x_kernel<c10::Half, float, 16, true>, ...
SIMT_TILE_KERNEL = re.compile(r"linear_(forward|grad_g|grad_x)_kernel<")
TILE_HEIGHT = re.compile(r"_kernel<[^<>]*?,\s*[^<>,]+,\s*(\d+)[>,]")


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--list", action="store_true", help="list the cases and the tile map; no GPU")
    p.add_argument("--quick", action="store_true", help="the smaller set run under the sanitizers")
    p.add_argument(
        "--lowest",
        action="store_true",
        help="each tile height at its lowest rank (with --quick: racecheck's and initcheck's set)",
    )
    p.add_argument("--no-profile", action="store_true", help="do not check kernel names")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--cases", help="only the cases whose name matches this regular expression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: check this script itself on the CPU kernels (float32/float64, no backends)",
    )
    p.add_argument("--kernels-json", type=Path, help="write the kernels each checked case ran")
    p.add_argument(
        "--optin-smem",
        type=int,
        help=f"--list: the opt-in shared memory to map ranks with (default: the device's, or "
        f"{SM90_OPTIN_SMEM}, sm_90's, without one)",
    )
    return p.parse_args(argv)


def list_cases(args) -> int:
    optin, label = args.optin_smem, "given"
    if optin is None:
        optin, label = SM90_OPTIN_SMEM, "sm_90 (H100/H200); no device asked"
    print(tile_map_text(optin, label))
    cases = select(all_cases(args.backends, optin, args.quick, args.lowest), args.cases)
    print(f"\n{len(cases)} cases{' (--quick)' if args.quick else ''}:")
    for case in cases:
        print(f"  {case.name}")
    return 0


def select(cases, pattern):
    return [c for c in cases if re.search(pattern, c.name)] if pattern else cases


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        return list_cases(args)

    # Deterministic algorithms (on around each case: see Runner.nan_filled_empties) accept
    # cuBLAS only with a fixed workspace, read when torch makes its first cuBLAS handle.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_reach: torch.cuda.is_available() is False: no GPU to reach", file=sys.stderr)
        return 2
    import lowrank_ext

    info = lowrank_ext.build_info()
    errors: list[str] = []
    backends = list(args.backends)
    if args.device == "cpu":  # a check of this script: the CPU kernels, float32 and float64
        backends = ["default"]
        optin, source = args.optin_smem or SM90_OPTIN_SMEM, "sm_90's, to choose the ranks"
        print(f"device: CPU (checking the script, not the CUDA kernels); {info}")
    else:
        if not info.get("cuda_kernels"):
            print(f"cuda_reach: lowrank_ext has no CUDA kernels: {info}", file=sys.stderr)
            return 2
        if not hasattr(lowrank_ext, "use_cuda_kernels"):
            errors.append(
                "lowrank_ext.use_cuda_kernels is missing (issue 13's backend switch): "
                "ran the default backend only"
            )
            backends = ["default"]
        if "tensorcore" in backends and not info.get("tensorcore_kernels"):
            errors.append(
                "this build has no tensor-core kernels (no CUTLASS headers at build time): "
                "the tensorcore cases did not run"
            )
            backends.remove("tensorcore")
        optin, source = device_optin_smem(torch)
        print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; {info}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # The float64 references are small: thread-pool wake-ups would cost more than the work.
    torch.set_num_threads(1 if args.device == "cpu" else min(8, os.cpu_count() or 1))
    print(tile_map_text(optin, source))
    caching_off = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1"
    runner = Runner(
        torch,
        lowrank_ext,
        args.seed,
        device=args.device,
        poison=not caching_off,
        profile=not args.no_profile,
    )
    cases = select(all_cases(backends, optin, args.quick, args.lowest), args.cases)
    if args.device == "cpu":
        cases = [c for c in cases if c.dtype in ("float32", "float64")]
    print(f"\n{len(cases)} cases")
    t0 = time.perf_counter()
    passed = 0
    for case in cases:
        start = time.perf_counter()
        try:
            if isinstance(case, LinearCase):
                err = runner.run_linear(case)
            else:
                err = runner.run_project_out(case)
        except Exception as exc:  # report every case; a sticky CUDA error ends the run below
            errors.append(f"{case.name}: {type(exc).__name__}: {exc}".splitlines()[0])
            print(f"FAIL {case.name}: {type(exc).__name__}: {exc}", flush=True)
            try:
                runner.sync()
            except Exception as sticky:
                errors.append(f"the CUDA context is lost ({sticky}); stopped after {case.name}")
                break
            continue
        passed += 1
        print(f"ok   {case.name}  err {err:.2e}  {time.perf_counter() - start:.2f}s", flush=True)

    if args.kernels_json:
        args.kernels_json.parent.mkdir(parents=True, exist_ok=True)
        args.kernels_json.write_text(json.dumps(runner.kernels, indent=1))
    for w in runner.warnings:
        print(f"WARNING: {w}")
    elapsed = time.perf_counter() - t0
    print(f"\n{passed} of {len(cases)} cases passed in {elapsed:.1f}s")
    for e in errors:
        print(f"ERROR: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
