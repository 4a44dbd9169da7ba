"""Timing table of lowrank_ext.linear against its baselines, in one run.

    python bench/run.py                      # quick default (CPU, 2 cores: 4–6 min)
    python bench/run.py --preset small       # only the small-batch rows
    python bench/run.py --device cuda        # the same table on a GPU (bf16)
    python bench/run.py --full --max-autotune

Rows: small-batch (B ∈ {1, 16, 64} × in→out ∈ {768→768, 768→3072, 4096→4096} × r ∈ {16, 32,
64}) and large (CPU fp32 B=4096, CUDA bf16 B=8192, in=out=4096, r ∈ {16, 64, 256}; --full adds
more), each forward under no_grad and forward+backward. Implementations (cases.py): fused, then
two_linear (two nn.Linear layers) and compiled (torch.compile of the unfused formula) — the
baselines that are the bar — and dense; eager and chained only with --impls. On a GPU whose build
has the tensor-core kernels, "tensorcore" (the opt-in forward of set_cuda_kernels("tensorcore"))
is timed beside fused (the default kernels) in the same run.

Prints a Markdown table (median time per call of each implementation, the speedup of the fused
op = baseline median / fused median, > 1: fused is faster, and the fused op's effective
bandwidth and % of the memory floor) and a summary (min and median speedup against two_linear
and compiled, per pass, over the small rows and over the large rows), and writes
OUT/results.json (meta: device, date, torch, CUDA, threads, ...; every record) and
OUT/throughput_vs_rank.png. Every implementation is checked against a float64 reference before
it is timed. Timing (timing.py): implementations interleaved round-robin, a sample is k
back-to-back calls with k chosen so it lasts ≥ 2 ms, CUDA events on a GPU, inputs rotated cold
in cache where they are large. Threads: torch's default (recorded), as a user would run.

The default CPU run took 6.2 min on a loaded 2-core machine with an empty inductor cache (~60
compiled graphs, one per shape and pass: ~65 s of it) and 4.1 min with a warm one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bandwidth import copy_bandwidth, floor_bytes
from cases import (
    BAR,
    DEFAULT_DTYPES,
    DEFAULT_IMPLS,
    IMPLS,
    MAX_AUTOTUNE,
    PASSES,
    PRESETS,
    TENSORCORE,
    dtype_name,
    is_small,
    make_problem,
    make_step,
    parse_dtype,
    preset_shapes,
)
from correctness import Reference, check
from plot import throughput_vs_rank
from report import RATIO, summary, summary_lines, table, write_json
from timing import TARGET_SAMPLE_S, calls_per_sample, copies_for_cold_cache, measure, summarize
from tqdm import tqdm

import lowrank_ext


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="all",
        help="rows: small-batch, large, or both (default)",
    )
    p.add_argument("--dtype", nargs="+", help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", nargs="+", type=int, help="rows of x (replaces the preset's)")
    p.add_argument("--features", nargs="+", help="N (in=out=N) or INxOUT (replaces the preset's)")
    p.add_argument("--ranks", nargs="+", type=int, help="replaces the preset's ranks")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed samples per implementation and row (default CPU: 30 where calls are looped,"
        " 7 where one call is a sample; CUDA: 50)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed rounds after the check and the calibration of calls per sample, which"
        " already warm up (default: 0 CPU, 2 CUDA)",
    )
    p.add_argument(
        "--sample-ms",
        type=float,
        default=TARGET_SAMPLE_S * 1e3,
        help="a sample is as many back-to-back calls as last this long (default %(default)s)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        choices=[*IMPLS, MAX_AUTOTUNE, TENSORCORE],
        help=f"default: {' '.join(DEFAULT_IMPLS)}",
    )
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--full", action="store_true", help="more large rows")
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="also torch.compile(mode='max-autotune') (compiling takes minutes)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    return p.parse_args(argv)


def select_shapes(args, device_type: str):
    """The preset's shapes, with --batch/--features/--ranks replacing those dimensions."""
    shapes = preset_shapes(args.preset, device_type, args.full)
    if args.batch:
        shapes = [dataclasses.replace(s, batch=b) for s in shapes for b in args.batch]
    if args.features:
        pairs = [
            tuple(int(v) for v in f.lower().split("x")) if "x" in f.lower() else (int(f),) * 2
            for f in args.features
        ]
        shapes = [
            dataclasses.replace(s, in_features=i, out_features=o) for s in shapes for i, o in pairs
        ]
    if args.ranks:
        shapes = [dataclasses.replace(s, rank=r) for s in shapes for r in args.ranks]
    return list(dict.fromkeys(shapes))  # dedupe, keep order


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads={torch.get_num_threads()}"


def tensorcore_column(args, device: torch.device, impls: list[str]) -> list[str]:
    """On a GPU the default table gains a "tensorcore" column (the opt-in tensor-core forward,
    timed beside "fused", the default cuBLAS composition) when the build has those kernels; its
    ratio is tensorcore / fused time, < 1: the tensor-core kernel is faster. Asked for by name
    (--impls tensorcore) where it cannot run, it is an error."""
    available = device.type == "cuda" and lowrank_ext.build_info()["tensorcore_kernels"]
    if TENSORCORE in impls and not available:
        sys.exit(
            "--impls tensorcore: needs --device cuda and a build with the tensor-core kernels "
            f"(tensorcore_kernels: {lowrank_ext.build_info()['tensorcore_kernels']})"
        )
    if available and args.impls is None and TENSORCORE not in impls:
        impls = impls[:1] + [TENSORCORE] + impls[1:]
    return impls


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    impls = list(args.impls or DEFAULT_IMPLS) + ([MAX_AUTOTUNE] if args.max_autotune else [])
    impls = sorted(dict.fromkeys(impls), key=[*IMPLS, MAX_AUTOTUNE, TENSORCORE].index)
    if device.type == "cuda" and "fused" in impls and not lowrank_ext.build_info()["cuda_kernels"]:
        sys.exit("lowrank_ext was built without CUDA kernels; rebuild with nvcc on PATH")
    impls = tensorcore_column(args, device, impls)
    dtypes = [parse_dtype(d) for d in (args.dtype or DEFAULT_DTYPES[device.type])]
    shapes = select_shapes(args, device.type)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 0)
    target_s = args.sample_ms / 1e3

    print(f"device: {device_name(device)}", file=sys.stderr)
    load_at_start = load_average()
    bandwidth = copy_bandwidth(device)
    print(
        f"copy bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (read+write)", file=sys.stderr
    )

    records: list[dict] = []
    dropped: dict[str, str] = {}  # an opt-in implementation that failed its check, and why
    dense_done: dict[tuple, dict] = {}  # dense does not depend on the rank: time it once per shape
    bar = tqdm(total=len(dtypes) * len(shapes) * len(args.passes), file=sys.stderr, unit="row")
    for dtype in dtypes:
        for shape in shapes:
            elt = torch.empty((), dtype=dtype).element_size()
            per_copy = elt * shape.batch * (shape.in_features + shape.out_features)  # x and dy
            copies = copies_for_cold_cache(per_copy, device)
            problem = make_problem(shape, dtype, device, copies=copies)
            ref = Reference(problem)
            for pass_ in args.passes:
                label = f"{shape.label()} {dtype_name(dtype)} {pass_}"
                dense_key = (shape.batch, shape.in_features, shape.out_features, dtype, pass_)
                steps, first_call = {}, {}
                for impl in list(impls):
                    if not (impl == "dense" and dense_key in dense_done):
                        bar.set_description(f"{label}: check {impl}")
                        steps[impl] = make_step(impl, problem, pass_)
                        try:
                            first_call[impl] = check_first_call(
                                impl, pass_, problem, ref, steps[impl]
                            )
                        except (AssertionError, RuntimeError) as exc:
                            if impl != TENSORCORE:
                                raise
                            # The opt-in kernel under test must not cost the default table.
                            dropped[TENSORCORE] = f"{label}: {type(exc).__name__}: {exc}"
                            print(
                                f"tensorcore column dropped: {dropped[TENSORCORE]}", file=sys.stderr
                            )
                            impls.remove(TENSORCORE)
                            del steps[impl]
                bar.set_description(f"{label}: timing")
                calls = {n: calls_per_sample(s, device, copies, target_s) for n, s in steps.items()}
                repeats = args.repeats or (50 if cuda else 30 if max(calls.values()) > 1 else 7)
                times = measure(steps, copies, device, warmup, repeats, calls=calls)
                stats = {
                    n: {
                        **summarize(t),
                        "first_call_s": first_call[n],
                        "calls_per_sample": calls[n],
                        "repeats": repeats,
                    }
                    for n, t in times.items()
                }
                if "dense" in stats:
                    dense_done[dense_key] = {**stats["dense"], "timed_at_rank": shape.rank}
                if "dense" in impls:
                    stats["dense"] = dense_done[dense_key]
                common = {
                    **dataclasses.asdict(shape),
                    "dtype": dtype_name(dtype),
                    "pass": pass_,
                    "row_class": "small" if is_small(shape) else "large",
                    "copies": copies,
                }
                group = [{**common, "impl": n, **stats[n]} for n in impls]
                add_ratios_and_floor(group, shape, dtype, bandwidth["bytes_per_s"])
                records += group
                # after every row, so a run cut off by a time limit still leaves its numbers
                write_json(args.out / "results.json", {"partial": True, "argv": sys.argv}, records)
                bar.update()
            del problem, ref
            gc.collect()
    bar.close()

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build_info": lowrank_ext.build_info(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        # torch's own huge-page switch for its CPU allocator (the baselines' outputs)
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "cpu_buffer_cache": lowrank_ext.cpu_buffer_cache(),
        "copy_bandwidth": bandwidth,
        "preset": args.preset,
        "full": args.full,
        "impls": impls,
        "dropped": dropped,
        "bar": list(BAR),
        "repeats": args.repeats or ("50" if cuda else "30 looped, 7 single-call"),
        "warmup": warmup,
        "target_sample_s": target_s,
        "argv": sys.argv,
        "partial": False,
        "load_average_1min": {"start": load_at_start, "end": load_average()},
        "ratio": RATIO,
        "summary": summary(records, BAR),
    }
    if cuda:
        meta["device_capability"] = list(torch.cuda.get_device_capability(device))
    print(
        f"\n{meta['device']} | torch {meta['torch']}"
        + (f" | CUDA {meta['cuda']}" if cuda else "")
        + f" | lowrank_ext {meta['build_info']['version']}"
        + (
            f" | fused's buffer cache {meta['build_info']['cpu_buffer_cache_mb']} MiB"
            if not cuda
            else ""
        )
        + f" | copy {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s | medians per call\n"
    )
    if not cuda and load_at_start is not None and load_at_start > 0.5:
        print(
            f"NOTE: load average {load_at_start:.1f} on {os.cpu_count()} cores before the run:"
            " other jobs preempt torch's worker threads, and a parallel region then waits for"
            " them (calls stuck at multiples of ~8 ms). Ratios are same-run, but rerun when idle.\n"
        )
    print(table(records, impls))
    print(f"\n(speedup of fused) = {RATIO}. Summary:")
    for line in summary_lines(meta["summary"]):
        print(f"- {line}")
    json_path = args.out / "results.json"
    write_json(json_path, meta, records)
    print(f"\nwrote {json_path}")
    png = args.out / "throughput_vs_rank.png"
    if throughput_vs_rank(records, impls, png, meta["device"]):
        print(f"wrote {png}")
    else:
        print("matplotlib is not installed: skipped the PNG (pip install matplotlib)")
    return 0


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): a loaded CPU distorts timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def check_first_call(impl, pass_, problem, ref, step) -> float:
    """Run step(0) once, check it against the float64 reference, return its time (which
    includes torch.compile's compilation, so it is kept apart from the timed calls)."""
    t0 = time.perf_counter()
    out = step(0)
    if problem.xs[0].is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    check(impl, pass_, problem, ref, out)
    return seconds


def add_ratios_and_floor(group: list[dict], shape, dtype, copy_bytes_per_s: float) -> None:
    """ratio = baseline / fused (on each baseline's record, and all of them in the fused
    record's "speedup"); the fused op's floor bytes, effective bandwidth and % of the floor."""
    fused = next((r for r in group if r["impl"] == "fused"), None)
    for rec in group:
        rec["ratio"] = None
        if fused is not None and rec is not fused:
            rec["ratio"] = rec["median_s"] / fused["median_s"]
    if fused is not None:
        fused["speedup"] = {r["impl"]: r["ratio"] for r in group if r is not fused}
        nbytes = floor_bytes(shape, dtype, fused["pass"])
        fused["floor_bytes"] = nbytes
        fused["floor_s"] = nbytes / copy_bytes_per_s
        fused["eff_bytes_per_s"] = nbytes / fused["median_s"]
        fused["pct_floor"] = 100 * fused["floor_s"] / fused["median_s"]


if __name__ == "__main__":
    sys.exit(main())
