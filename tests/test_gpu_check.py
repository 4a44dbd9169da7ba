"""The one-shot GPU check's CPU-only parts, so that it cannot rot between GPU windows.

tools/gpu_check.py's plan (--dry-run) and bookkeeping, the SIMT tile map of tools/cuda_reach.py
against values worked out by hand from csrc/cuda/linear.cu's formula, the reach's case list
(--list), and the reach's checking code run on the CPU kernels (--device cpu). None needs a GPU.
"""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

import pytest
import torch

import lowrank_ext

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
cuda_reach = gpu_check.cuda_reach
SM90, SM80 = cuda_reach.SM90_OPTIN_SMEM, cuda_reach.SM80_OPTIN_SMEM


def _run(script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(TOOLS / script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- the plan --------------------------------------------------------------------------------


def test_dry_run_plans_every_step_and_runs_nothing(tmp_path):
    out = _run("gpu_check.py", "--dry-run", "--out", tmp_path / "check")
    assert out.returncode == 0, out.stderr
    plan = out.stdout
    positions = []
    for step in gpu_check.STEPS:
        header = f"[{step.name}] limit {step.budget_s}s"
        assert header in plan
        positions.append(plan.index(header))
    assert positions == sorted(positions)  # in the order they run
    for command in (
        "FORCE_CUDA=1",
        "TORCH_CUDA_ARCH_LIST=",
        "pip install --no-build-isolation --no-deps",
        "-m pytest -m cuda tests",
        "tools/cuda_reach.py --kernels-json",
        "bench/run.py --device cuda --repeats 20 --out",
    ):
        assert command in plan, command
    for tool in gpu_check.SANITIZER_TOOLS:
        assert f"--tool {tool} --error-exitcode 1" in plan
    assert plan.count("tools/cuda_reach.py --quick --no-profile") == 4
    assert "BM=64" in plan and "at::mm fallback" in plan  # the tile map
    assert not (tmp_path / "check").exists()


def test_dry_run_of_a_subset_without_the_build(tmp_path):
    out = _run("gpu_check.py", "--dry-run", "--skip-build", "--steps", "bench", "build", "tests")
    assert out.returncode == 0, out.stderr
    headers = [line.split("]")[0][1:] for line in out.stdout.splitlines() if line[:1] == "["]
    assert headers == ["build", "tests", "bench"]  # the run's order, not the command line's
    commands = [line for line in out.stdout.splitlines() if line.startswith("  $ ")]
    assert not any("pip install" in c for c in commands)  # --skip-build: build_info only
    assert any("<python code> <device capability" in c for c in commands)


def test_dry_run_installs_the_cutlass_wheel_and_requires_cutlass(tmp_path):
    wheel = tmp_path / "nvidia_cutlass-4.2.0.0-py3-none-any.whl"
    out = _run("gpu_check.py", "--dry-run", "--steps", "build", "tests", "--cutlass-wheel", wheel)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("  $ ")]
    install = [c for c in commands if str(wheel) in c]
    assert (
        len(install) == 1 and "pip install --no-build-isolation --no-deps --no-index" in install[0]
    )
    build = next(c for c in commands if " -e ." in c)
    assert commands.index(install[0]) < commands.index(build)  # headers before the build
    assert "LOWRANK_EXT_REQUIRE_CUTLASS=1" in build
    tests = next(c for c in commands if "-m pytest" in c)
    assert "LOWRANK_EXT_REQUIRE_CUTLASS=1" in tests  # a missing tensorcore set fails, never skips


def test_reach_lists_the_tensorcore_cases():
    out = _run("cuda_reach.py", "--list", "--quick", "--lowest")
    assert out.returncode == 0, out.stderr
    names = [line.strip() for line in out.stdout.splitlines() if "linear/tensorcore/" in line]
    # every padded rank of the kernel (32, 64, 128, 256), both load paths, and the fallbacks
    for r in ("r16/", "r17/", "r40/", "r100/", "r256/", "r257/"):
        assert any(r in n for n in names), r
    assert any("/B0/" in n for n in names) and any("/float32/" in n for n in names)
    taken = [
        cuda_reach.tensorcore_takes(c)
        for c in cuda_reach.tensorcore_cases(("tensorcore",), True, True)
    ]
    assert taken.count(False) == 3  # the empty batch, float32 and r = 257


def test_tensorcore_kernels_index_math_matches_float64():
    # tools/tensorcore_model.py: the kernel's tiles, ldmatrix addresses, warp layout, column split
    # and predicates, with ldmatrix and mma.m16n8k16 modelled from the PTX fragment layouts.
    model = _load("tensorcore_model")
    for shape in model.SHAPES:
        assert model.check(*shape) < 1e-9, shape  # NaN (an element nobody wrote) fails too
    # B = 1..64 at out = 4096 on 132 SMs: 32 blocks; B = 8192 (128 row blocks): no split
    assert model.splits(1, 32, 132) == 32 and model.splits(128, 32, 132) == 1


def test_unknown_step_is_refused():
    out = _run("gpu_check.py", "--dry-run", "--steps", "tests", "lint")
    assert out.returncode != 0
    assert "lint" in out.stderr


def test_time_limits_fit_the_nine_minutes():
    # The deadline stops the run inside 9 minutes whatever the steps take. Build 4 min, tests 2;
    # the sanitizers had 2 min together until the first H200 run (2026-11-30) found racecheck and
    # initcheck unfinished after 30 s each (memcheck took 18 s, synccheck 14 s). Measured there:
    # env 7 s, build 67, tests 45, reach 19, memcheck 18, synccheck 14, bench 69: 239 s, which
    # leaves racecheck 150 s and initcheck 100 s inside the 530 s deadline.
    assert gpu_check.DEFAULT_DEADLINE_S < 9 * 60
    budget = {s.name: s.budget_s for s in gpu_check.STEPS}
    assert budget["build"] <= 240 and budget["tests"] <= 120
    assert sum(budget[t] for t in gpu_check.SANITIZER_TOOLS) <= 315


# ---- the SIMT tile map -----------------------------------------------------------------------

# Worked by hand from TileConfig<BM> and tile_smem_elems in csrc/cuda/linear.cu, with
# u32 = round_up(r, 32), u8 = round_up(r, 8), soft = 96 KiB and the opt-in limit in acc elements:
#   BM=64: 64(u32 + 1) + 64·33 + 32·65  = 64·u32 + 4256    (BK 32, RC 64)
#   BM=16: 16(u32 + 1) + 16·33 + 32·65  = 16·u32 + 2624    (BK 32, RC 64)
#   BM=4:   4(u32 + 1) +  4·33 + 32·257 =  4·u32 + 8360    (BK 32, RC 256)
#   BM=1:    (u8 + 1)  +     9 +  8·1025 =      u8 + 8210    (BK 8, RC 1024)
# float32 (24576 elements soft): BM=64 to r=288, 16 to 1344, 4 to 4032, 1 to 16360; above it
# the opt-in limit (sm_90 58112 elements, sm_80 41728) keeps BM=1 to 49896 (sm_80 33512).
# float64 (12288 soft): 96, 576, 960, 4072; then on sm_90 (29056) BM=4 comes back to 5152
# (4·5152 + 8360 = 28968) and BM=1 holds to 20840; sm_80 (20864): BM=1 to 12648.
HAND_TILE_ROWS = [
    # (r, accumulator bytes, opt-in bytes, BM)
    (1, 4, SM90, 64),
    (288, 4, SM90, 64),
    (289, 4, SM90, 16),
    (300, 4, SM90, 16),
    (1344, 4, SM90, 16),
    (1345, 4, SM90, 4),
    (1400, 4, SM90, 4),
    (4032, 4, SM90, 4),
    (4033, 4, SM90, 1),
    (4100, 4, SM90, 1),
    (16360, 4, SM90, 1),
    (16361, 4, SM90, 1),
    (20000, 4, SM90, 1),
    (49896, 4, SM90, 1),
    (49897, 4, SM90, 0),
    (20000, 4, SM80, 1),
    (33512, 4, SM80, 1),
    (33513, 4, SM80, 0),
    (96, 8, SM90, 64),
    (97, 8, SM90, 16),
    (576, 8, SM90, 16),
    (577, 8, SM90, 4),
    (960, 8, SM90, 4),
    (961, 8, SM90, 1),
    (4072, 8, SM90, 1),
    (4073, 8, SM90, 4),
    (5152, 8, SM90, 4),
    (5153, 8, SM90, 1),
    (20840, 8, SM90, 1),
    (20841, 8, SM90, 0),
    (12648, 8, SM80, 1),
    (12649, 8, SM80, 0),
]


@pytest.mark.parametrize("r, acc, optin, bm", HAND_TILE_ROWS)
def test_tile_rows_match_values_worked_by_hand(r, acc, optin, bm):
    assert cuda_reach.pick_tile_rows(r, acc, optin) == bm


@pytest.mark.parametrize(
    "bm, r, elems",
    [
        (64, 288, 64 * 289 + 64 * 33 + 32 * 65),  # 22688
        (16, 300, 16 * 321 + 16 * 33 + 32 * 65),  # 7744
        (4, 1400, 4 * 1409 + 4 * 33 + 32 * 257),  # 13992
        (1, 4100, 4105 + 9 + 8 * 1025),  # 12314
        (1, 49896, 49897 + 9 + 8 * 1025),  # 58106: fits sm_90's 58112
        (1, 49897, 49905 + 9 + 8 * 1025),  # 58114: does not
    ],
)
def test_tile_shared_memory_elements(bm, r, elems):
    assert cuda_reach.tile_smem_elems(bm, r) == elems


def test_tile_segments_float32_sm90():
    S = cuda_reach.Segment
    assert cuda_reach.tile_segments(4, SM90) == [
        S(64, False, 1, 288),
        S(16, False, 289, 1344),
        S(4, False, 1345, 4032),
        S(1, False, 4033, 16360),
        S(1, True, 16361, 49896),
        S(0, False, 49897, None),
    ]
    assert cuda_reach.fallback_rank(4, SM80) == 33513


def test_issue_ranks_miss_two_paths_that_the_reach_adds():
    # Issue 13's r in {300, 1400, 4100, 20000} give BM 16, 4, 1, 1 on sm_90: not BM=64 and not
    # the fallback. The reach and tests/test_cuda.py add them.
    issue = {cuda_reach.pick_tile_rows(r, 4, SM90) for r in cuda_reach.ISSUE_RANKS}
    assert issue == {16, 4, 1}
    for acc in (4, 8):
        for optin in (SM90, SM80):
            ranks = cuda_reach.representative_ranks(acc, optin)
            assert {cuda_reach.pick_tile_rows(r, acc, optin) for r in ranks} == {64, 16, 4, 1, 0}


def test_opt_in_shared_memory_from_torch_or_the_table():
    def fake_torch(major, minor, **props):
        device = SimpleNamespace(major=major, minor=minor, **props)
        return SimpleNamespace(cuda=SimpleNamespace(get_device_properties=lambda index: device))

    optin = cuda_reach.device_optin_smem
    assert optin(fake_torch(8, 9, shared_memory_per_block_optin=101376)) == (101376, ANY)
    assert optin(fake_torch(9, 0))[0] == SM90  # torch without the property: the table's entry
    with pytest.raises(RuntimeError, match="sm_75"):
        optin(fake_torch(7, 5))


# ---- the reach's cases -----------------------------------------------------------------------


def test_reach_lists_its_cases_without_a_gpu():
    out = _run("cuda_reach.py", "--list")
    assert out.returncode == 0, out.stderr
    names = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
    names = [n for n in names if n.startswith(("linear/", "project_out/"))]
    for dtype in cuda_reach.DTYPE_NAMES:
        for bm in (64, 16, 4, 1, 0):  # every tile height and the fallback, for every dtype
            for backend in cuda_reach.TILE_BACKENDS:
                prefix = f"linear/{backend}/{dtype}/"
                assert any(n.startswith(prefix) and n.endswith(f"/BM{bm}") for n in names)
    listed = "\n".join(names) + "\n"
    for part in ("/B0/", "/B1/", "/B2x5/", "/full/", "/nobias/", "/raw:", "/op:none", "/op:U+S"):
        assert part in listed, part
    for part in ("/passes1/", "/passes2/", "/normalize/", "/plain/", "n300k0p3", "grads:Q\n"):
        assert part in listed, part
    quick = _run("cuda_reach.py", "--list", "--quick")
    assert quick.returncode == 0
    assert 0 < quick.stdout.count("\n  ") < out.stdout.count("\n  ")


def test_reach_quick_set_keeps_every_kernel_instantiation():
    full = cuda_reach.all_cases(cuda_reach.BACKENDS, SM90, quick=False)
    quick = cuda_reach.all_cases(cuda_reach.BACKENDS, SM90, quick=True)

    def kinds(cases):
        return {(c.backend, c.dtype, c.core, c.bm, c.bias) for c in cases if hasattr(c, "bm")} | {
            (c.dtype, c.passes, c.normalize, c.k > 0) for c in cases if hasattr(c, "passes")
        }

    fused_tiles = {k for k in kinds(full) if k[0] == "fused" and k[3] is not None}
    assert fused_tiles <= kinds(quick)


def test_reach_lowest_set_reaches_every_fused_tile_height_in_float32():
    lowest = cuda_reach.all_cases(cuda_reach.BACKENDS, SM90, quick=True, lowest=True)
    fused = [c for c in lowest if hasattr(c, "bm") and c.backend == "fused"]
    f32 = {c.bm for c in fused if c.dtype == "float32"}
    assert f32 >= {64, 16, 4, 1, cuda_reach.FALLBACK}
    for dtype in ("bfloat16", "float16", "float64"):
        assert {(c.bm, c.core) for c in fused if c.dtype == dtype and c.r > 1000} == set()
        assert {(64, "diag"), (64, "full")} <= {(c.bm, c.core) for c in fused if c.dtype == dtype}
    # no BM=1 case over the 96 KiB soft budget (57 s under racecheck on the H200), lowest ranks
    tiles = [c for c in fused if c.bm == 1]
    assert tiles and max(c.r for c in tiles) == 4033
    quick = cuda_reach.all_cases(cuda_reach.BACKENDS, SM90, quick=True)
    assert len(lowest) < len(quick)


def test_sanitizer_instrumentation():
    # initcheck must see every kernel's writes (torch's too), or it reports false reads
    check = gpu_check.Check(gpu_check.parse_args(["--dry-run"]))
    for tool in gpu_check.SANITIZER_TOOLS:
        [(cmd, env)] = check.commands(tool)
        words = [str(c) for c in cmd]
        assert ("--kernel-name" in words) == (tool in ("racecheck", "synccheck")), tool
        assert ("--lowest" in words) == (tool in ("racecheck", "initcheck")), tool
        assert env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


# ---- the reach's checking code, on the CPU kernels -------------------------------------------


def test_reach_checks_pass_on_the_cpu_kernels():
    # Small ranks only: the CPU kernels' work buffers grow with r (issue 13, D10).
    pattern = r"r(3|5|7|17)/|project_out/float(32|64)/n300"
    out = _run("cuda_reach.py", "--device", "cpu", "--cases", pattern)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cases = [line for line in out.stdout.splitlines() if line.startswith("ok   ")]
    assert len(cases) >= 40
    assert any("/raw:" in c for c in cases) and any("project_out" in c for c in cases)
    assert "FAIL" not in out.stdout


class _Wrong:
    """lowrank_ext with a linear that is off by a little, or leaves a column unwritten."""

    reference = lowrank_ext.reference

    def __init__(self, how):
        self.how = how

    def linear(self, *args):
        y = lowrank_ext.linear(*args)
        if self.how == "scaled":
            return y * 1.001
        out = torch.empty_like(y)  # NaN while the reach runs a case
        out[..., :-1] = y[..., :-1]  # the last column is never written
        return out


@pytest.mark.parametrize("how, message", [("scaled", "max error"), ("unwritten", "not finite")])
def test_reach_catches_a_wrong_result(how, message):
    runner = cuda_reach.Runner(torch, _Wrong(how), 0, device="cpu")
    case = cuda_reach.LinearCase("default", "float32", (9,), 8, 6, 3)
    with pytest.raises(cuda_reach.Mismatch, match=message):
        runner.run_linear(case)
    runner = cuda_reach.Runner(torch, lowrank_ext, 0, device="cpu")
    assert runner.run_linear(case) < 1e-5


def test_reach_compare():
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert cuda_reach.compare("a", ref.float(), ref, "float32", 1) == 0
    with pytest.raises(cuda_reach.Mismatch, match="shape"):
        cuda_reach.compare("a", ref[:1], ref, "float32", 1)
    with pytest.raises(cuda_reach.Mismatch, match="expected no"):
        cuda_reach.compare("a", ref, None, "float32", 1)
    # The tolerance grows as the square root of the reduction length past 256.
    assert cuda_reach.tolerance("float32", 256 * 100) == pytest.approx(1e-3)
    cuda_reach.compare("a", ref * (1 + 5e-4), ref, "float32", 256 * 100)


def test_reach_reads_the_tile_height_from_kernel_names():
    runner = cuda_reach.Runner(torch, lowrank_ext, 0)
    case = cuda_reach.LinearCase("fused", "float32", (3,), 4, 4, 300, bm=16)
    names = [
        "void lowrank_ext::(anonymous namespace)::linear_forward_kernel<float, float, 16>(float"
        " const*, float const*, float const*, float const*, float*, float*, long, long, long, int)",
        "void lowrank_ext::(anonymous namespace)::linear_grad_x_kernel<float, float, 16, true>()",
    ]
    runner.check_kernel_names(case, names)
    with pytest.raises(cuda_reach.Mismatch, match="predicted BM=64"):
        runner.check_kernel_names(
            cuda_reach.LinearCase("fused", "float32", (3,), 4, 4, 9, bm=64), names
        )
    cublas = cuda_reach.LinearCase("cublas", "float32", (3,), 4, 4, 300, bm=16)
    with pytest.raises(cuda_reach.Mismatch, match="SIMT tile kernels"):
        runner.check_kernel_names(cublas, names)
    runner.check_kernel_names(cublas, ["ampere_sgemm_128x64_nn", "void at::native::reduce"])


def test_reach_checks_where_the_tensorcore_kernel_ran():
    runner = cuda_reach.Runner(torch, lowrank_ext, 0)
    tc = "void lowrank_ext::(anonymous namespace)::linear_forward_tc_kernel<__nv_bfloat16, 32>()"
    grad = "void lowrank_ext::(anonymous namespace)::linear_grad_g_tc_kernel<__nv_bfloat16, 32>()"
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"
    taken = cuda_reach.LinearCase("tensorcore", "bfloat16", (67,), 48, 77, 16)
    runner.check_kernel_names(taken, [tc, grad, gemm])  # g and dbias on it, the rest cuBLAS
    with pytest.raises(cuda_reach.Mismatch, match="linear_forward_tc_kernel did not run"):
        runner.check_kernel_names(taken, [grad, gemm])
    with pytest.raises(cuda_reach.Mismatch, match="linear_grad_g_tc_kernel did not run"):
        runner.check_kernel_names(taken, [tc, gemm])
    for grads in ((), ("U",), ("bias",), ("U", "bias")):  # no g needed: no first pass
        case = cuda_reach.LinearCase("tensorcore", "bfloat16", (41,), 36, 20, 7, grads=grads)
        runner.check_kernel_names(case, [tc, gemm])
        with pytest.raises(cuda_reach.Mismatch, match="linear_grad_g_tc_kernel ran"):
            runner.check_kernel_names(case, [tc, grad, gemm])
    for not_taken in (
        cuda_reach.LinearCase("tensorcore", "float32", (67,), 48, 77, 16),
        cuda_reach.LinearCase("tensorcore", "bfloat16", (5,), 40, 30, 257),
        cuda_reach.LinearCase("tensorcore", "bfloat16", (0,), 48, 77, 16),
    ):
        runner.check_kernel_names(not_taken, [gemm])
        with pytest.raises(cuda_reach.Mismatch, match="linear_forward_tc_kernel ran"):
            runner.check_kernel_names(not_taken, [tc, gemm])


def test_reach_checks_that_the_switch_took_effect():
    stuck = SimpleNamespace(cuda_kernels=lambda: "cublas", build_info=lambda: {})
    runner = cuda_reach.Runner(torch, stuck, 0)
    runner.check_backend_selected("cublas")
    runner.check_backend_selected("default")  # no switch: nothing to check
    with pytest.raises(cuda_reach.Mismatch, match="left cuda_kernels"):
        runner.check_backend_selected("fused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reach's answer to no kernels")
def test_reach_profiler_without_cuda_kernels_warns_once():
    runner = cuda_reach.Runner(torch, lowrank_ext, 0)  # device "cuda": tile cases are profiled
    case = cuda_reach.LinearCase("fused", "float32", (3,), 4, 4, 300, bm=16)
    assert runner.profiled(case, lambda: torch.ones(3) @ torch.ones(3)) == 3
    assert runner.kernels == {case.name: []}
    assert runner.profiler_works is False and len(runner.warnings) == 1
    runner.profiled(case, lambda: None)  # profiling is off from then on
    assert len(runner.warnings) == 1


# ---- the check's bookkeeping -----------------------------------------------------------------


def test_a_step_past_its_limit_is_ended(tmp_path):
    log = tmp_path / "sleep.log"
    rc, seconds = gpu_check.run_logged(
        [sys.executable, "-c", "import time; time.sleep(60)"], log, 1
    )
    assert rc is None and seconds < 20
    assert "# exit TIMEOUT" in log.read_text()


def test_sanitizer_reports_are_read():
    verdict = gpu_check.sanitizer_verdict
    assert verdict("========= ERROR SUMMARY: 0 errors\n")["errors"] == 0
    bad = verdict(
        "========= COMPUTE-SANITIZER\n"
        "========= Invalid __shared__ write of size 4 bytes\n"
        "=========     at lowrank_ext::linear_forward_kernel<float, float, 64>+0x1a0\n"
        "========= ERROR SUMMARY: 3 errors\n"
    )
    assert bad["errors"] == 3 and bad["first"].startswith("Invalid __shared__ write")
    race = verdict(
        "========= Error: Race reported between Write access at f+0x10 and Read access\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    )
    assert race["errors"] == 1 and race["warnings"] == 1
    assert verdict("Killed\n")["errors"] is None  # no summary: the tool did not finish


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
        'skipped="3" tests="10" time="1.0"></testsuite></testsuites>'
    )
    assert gpu_check.junit_counts(xml) == "4 passed, 2 failed, 1 errors, 3 skipped"
    assert gpu_check.junit_counts(tmp_path / "missing.xml") == ""


def test_logs_are_pruned_only_under_the_device_tools_folder(tmp_path, monkeypatch):
    args = gpu_check.parse_args(["--out", str(tmp_path / "out" / "gpu_check")])
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.Check(args).prune()
    monkeypatch.setenv("OUT", str(tmp_path / "elsewhere"))
    assert not gpu_check.Check(args).prune()
    monkeypatch.delenv("OUT")
    assert not gpu_check.Check(args).prune()
    args.prune_logs = "yes"
    assert gpu_check.Check(args).prune()


def _fake_steps(check, monkeypatch, failing):
    """Replace every step of check by one that passes, or fails if its name is in failing."""
    ran = []

    def fake(name):
        def step(res, log, end):
            ran.append(name)
            res.status = "FAIL" if name in failing else "PASS"
            log.write_text(f"{name} {res.status}\n")

        return step

    for step in gpu_check.STEPS:
        monkeypatch.setattr(check, f"step_{step.name}", fake(step.name))
    return ran


def test_a_failed_build_skips_the_rest_a_failed_test_run_does_not(tmp_path, monkeypatch):
    args = gpu_check.parse_args(["--out", str(tmp_path / "a"), "--prune-logs", "no"])
    check = gpu_check.Check(args)
    ran = _fake_steps(check, monkeypatch, failing={"build"})
    results = check.run()
    assert ran == ["env", "build"]
    assert [r.status for r in results] == ["PASS", "FAIL"] + ["SKIP"] * 7
    assert check.finish(results) == 1

    args = gpu_check.parse_args(["--out", str(tmp_path / "b"), "--prune-logs", "no"])
    check = gpu_check.Check(args)
    ran = _fake_steps(check, monkeypatch, failing={"tests", "memcheck"})
    results = check.run()
    assert ran == list(gpu_check.STEP_NAMES)
    assert check.finish(results) == 1
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert "---- tests (FAIL)" in summary and "bench      PASS" in summary
    assert (tmp_path / "b" / "logs" / "bench.log").exists()  # --prune-logs no


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how a run without a GPU fails")
def test_a_run_without_a_gpu_fails_clearly_and_packs_its_logs(tmp_path):
    out_dir = tmp_path / "check"
    out = _run("gpu_check.py", "--out", out_dir, "--steps", "env", "reach", "--prune-logs", "yes")
    assert out.returncode == 1, out.stdout + out.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in summary["steps"]}
    assert status["env"] == ("FAIL", "torch sees no CUDA device")
    assert status["reach"][0] == "FAIL"  # no build step asked for: it runs, and finds no GPU
    assert summary["overall"] == "FAIL"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "gpu_check_logs.tar.gz",
        "summary.json",
        "summary.txt",
    ]
    with tarfile.open(out_dir / "gpu_check_logs.tar.gz") as tar:
        members = set(tar.getnames())
    assert {"logs/env.log", "logs/reach.log", "plan.txt", "summary.json"} <= members
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("logs: ") and lines[-2].startswith("overall    FAIL")
    assert "no GPU to reach" in out.stdout  # the failed step's log tail, above the table
