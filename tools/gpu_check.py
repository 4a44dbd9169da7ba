#!/usr/bin/env python3
"""One-shot GPU check of lowrank_ext, for a 15-minute GPU window: one command, one log folder.

    python tools/gpu_check.py --out $OUT/gpu_check       # on the GPU machine, from the repo root
    python tools/gpu_check.py --dry-run                  # the plan; runs nothing, needs no GPU
    python tools/gpu_check.py --skip-build --steps tests reach memcheck
    python tools/gpu_check.py --cutlass-wheel build/deps/nvidia_cutlass-4.2.0.0-py3-none-any.whl

The GPU machine has no network: the CUTLASS headers of the tensor-core kernels come from the
nvidia-cutlass wheel at --cutlass-wheel (default build/deps/nvidia_cutlass-4.2.0.0-py3-none-any.whl
when it exists; carry build/deps to the machine), from an nvidia-cutlass already installed, or from
CUTLASS_PATH. The build requires them (LOWRANK_EXT_REQUIRE_CUTLASS=1): no CUTLASS, no build.

Steps, in order, each with its own time limit and its own log (LOG/<step>.log):
  env        nvidia-smi, nvcc, torch/CUDA versions, the device, the SIMT tile map -> env.txt
  build      pip install the CUTLASS wheel (when given or found), then pip install
             --no-build-isolation --no-deps -e . for the device's arch only (TORCH_CUDA_ARCH_LIST
             from its capability, MAX_JOBS = all cores, FORCE_CUDA=1 and
             LOWRANK_EXT_REQUIRE_CUTLASS=1 so a failed CUDA or tensor-core build is an error, never
             a build without them); then build_info()["cuda_kernels"] and
             ["tensorcore_kernels"] must be True
  tests      python -m pytest -m cuda tests (every CUDA test: tests/test_cuda.py and the
             "cuda" parameters of the other files, the "tensorcore" set included),
             CUBLAS_WORKSPACE_CONFIG=:4096:8
  reach      tools/cuda_reach.py: every CUDA kernel once against float64, kernel names checked
  memcheck, racecheck, synccheck, initcheck
             compute-sanitizer --tool T --error-exitcode 1 over tools/cuda_reach.py --quick, with
             the caching allocator off (racecheck and initcheck over --quick --lowest);
             racecheck and synccheck only instrument lowrank_ext's own kernels
             (--kernel-name kns=lowrank_ext), memcheck and initcheck every kernel (cuBLAS too:
             a bad leading dimension passed to it is ours)
  bench      python bench/run.py --device cuda --repeats 20 (default shapes; a "tensorcore"
             column beside the default kernels) -> LOG/bench/

A step that fails does not stop the ones after it unless they need it (no build: nothing else
runs). The whole run stops starting steps at --deadline seconds (default 530: under 9 minutes).
At the end: summary.json, summary.txt (the PASS/FAIL table, also printed last, with the tail of
each failed step's log printed above it) and gpu_check_logs.tar.gz (every log) in --out. When
--out lies under $OUT (the device tool's folder, which brings back at most 8 files), the loose
logs are removed after they are packed (--prune-logs). Exit code 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import cuda_reach  # noqa: E402  (stdlib only at import: the tile map)

PYTHON = sys.executable
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# compute-sanitizer's substring filter: every kernel of csrc/cuda/ lives in namespace lowrank_ext.
OWN_KERNELS = "kns=lowrank_ext"
DEFAULT_DEADLINE_S = 530
DEFAULT_CUTLASS_WHEEL = ROOT / "build" / "deps" / "nvidia_cutlass-4.2.0.0-py3-none-any.whl"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # this step's own time limit (the deadline may cut it shorter)
    needs: tuple[str, ...]  # steps that must have passed for this one to run
    what: str


STEPS = (
    Step("env", 20, (), "record nvidia-smi, nvcc, torch/CUDA, the device and the tile map"),
    Step("build", 240, ("env",), "pip install -e . for the local arch, FORCE_CUDA=1"),
    Step("tests", 120, ("build",), "pytest -m cuda tests"),
    Step("reach", 30, ("build",), "tools/cuda_reach.py against float64"),
    Step("memcheck", 45, ("build",), "compute-sanitizer memcheck over cuda_reach.py --quick"),
    Step("racecheck", 150, ("build",), "compute-sanitizer racecheck (lowrank_ext kernels)"),
    Step("synccheck", 20, ("build",), "compute-sanitizer synccheck (lowrank_ext kernels)"),
    Step("initcheck", 100, ("build",), "compute-sanitizer initcheck (lowrank_ext kernels)"),
    Step("bench", 150, ("build",), "bench/run.py --device cuda --repeats 20"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclasses.dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, TIMEOUT, SKIP
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: int | None = None
    detail: str = ""
    log: str | None = None


# ---- finding the tools ---------------------------------------------------------------------------


def find_cuda_home() -> Path | None:
    """A CUDA toolkit: $CUDA_HOME, $CUDA_PATH, the nvcc on PATH, /usr/local/cuda(-*)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if (
            c
            and (Path(c) / "bin" / "nvcc").exists()
            and (Path(c) / "include/cuda_runtime.h").exists()
        ):
            return Path(c)
    return None


def find_compute_sanitizer(cuda_home: Path | None) -> Path | None:
    """compute-sanitizer on PATH, in $CUDA_HOME/bin, the toolkit found, or /usr/local/cuda*/bin."""
    found = shutil.which("compute-sanitizer")
    if found:
        return Path(found)
    homes = [os.environ.get("CUDA_HOME"), str(cuda_home) if cuda_home else None]
    homes += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        for sub in ("bin", "compute-sanitizer"):
            exe = Path(home) / sub / "compute-sanitizer"
            if exe.exists():
                return exe
    return None


# ---- running a command with a time limit ---------------------------------------------------------


def run_logged(
    cmd, log: Path, timeout: float, env_extra=None, append=False
) -> tuple[int | None, float]:
    """Run cmd in ROOT with stdout and stderr into log; (exit code or None on timeout, seconds).

    The command runs in its own process group, which is ended (by its id) when time runs out.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    start = time.monotonic()
    with open(log, "a" if append else "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        if env_extra:
            f.write(f"# environment: {json.dumps(env_extra)}\n")
        f.write(f"# limit {timeout:.0f}s, started {now()}\n\n")
        f.flush()
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            f.write(f"could not start: {exc}\n")
            return 127, time.monotonic() - start
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = None
        seconds = time.monotonic() - start
        f.write(f"\n# exit {rc if rc is not None else 'TIMEOUT'} after {seconds:.1f}s\n")
    return rc, seconds


def stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def capture(cmd, timeout=30) -> str:
    """A short command's output (for the environment record); its error, never an exception."""
    try:
        out = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        return (out.stdout + out.stderr).strip() or f"(no output, exit {out.returncode})"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(failed: {exc})"


# ---- the steps -----------------------------------------------------------------------------------

DEVICE_PROBE = r"""
import json, torch
d = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, capability=[p.major, p.minor], sm_count=p.multi_processor_count,
             total_memory_gib=round(p.total_memory / 2**30, 1),
             optin_smem=getattr(p, "shared_memory_per_block_optin", None))
print("DEVICE_JSON " + json.dumps(d))
"""

BUILD_VERIFY = r"""
import json, sys
import lowrank_ext
info = lowrank_ext.build_info()
print("lowrank_ext from", lowrank_ext.__file__)
print(json.dumps(info, indent=1))
assert info["cuda_kernels"], "build_info()['cuda_kernels'] is False: no CUDA kernels were built"
assert info["tensorcore_kernels"], "build_info()['tensorcore_kernels'] is False: no CUTLASS"
arch = sys.argv[1]
assert any(a.split("+")[0] == arch for a in info["cuda_archs"]), (
    f"built for {info['cuda_archs']}, not for this device's {arch}")
print("OK: CUDA kernels built for", info["cuda_archs"])
"""


class Check:
    def __init__(self, args):
        self.args = args
        self.out: Path = args.out.resolve()
        self.logs = self.out / "logs"
        self.cuda_home = find_cuda_home()
        self.sanitizer = find_compute_sanitizer(self.cuda_home)
        self.device: dict = {}
        self.arch: str | None = args.arch
        self.cutlass_wheel: Path | None = args.cutlass_wheel
        if self.cutlass_wheel is None and DEFAULT_CUTLASS_WHEEL.exists():
            self.cutlass_wheel = DEFAULT_CUTLASS_WHEEL
        self.start = time.monotonic()

    # -- the plan

    def commands(self, name: str) -> list[tuple[list, dict]]:
        """The commands a step runs, with their extra environment (for the plan and the run)."""
        logs, arch = self.logs, self.arch or "<device capability, e.g. 9.0>"
        reach = [PYTHON, "tools/cuda_reach.py"]
        if name == "env":
            return [
                (["nvidia-smi"], {}),
                (["nvcc", "--version"], {}),
                ([PYTHON, "-c", DEVICE_PROBE], {}),
            ]
        if name == "build":
            verify = ([PYTHON, "-c", BUILD_VERIFY, arch], {})
            if self.args.skip_build:
                return [verify]
            env = {
                "FORCE_CUDA": "1",
                "LOWRANK_EXT_REQUIRE_CUTLASS": "1",
                "TORCH_CUDA_ARCH_LIST": arch,
                "MAX_JOBS": str(os.cpu_count() or 1),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_NO_INPUT": "1",
            }
            if self.cuda_home:
                env["CUDA_HOME"] = str(self.cuda_home)
            pip = [PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps"]
            cmds = []
            if self.cutlass_wheel:  # headers only: its Python side's dependencies are not needed
                cmds.append((pip + ["--no-index", str(self.cutlass_wheel)], env))
            return cmds + [(pip + ["--no-index", "-v", "-e", "."], env), verify]
        if name == "tests":
            cmd = [PYTHON, "-m", "pytest", "-m", "cuda", "tests", "-q", "-rfEs"]
            cmd += ["--maxfail=30", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=100"]
            cmd += [f"--junitxml={logs / 'tests.xml'}"]
            env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "LOWRANK_EXT_REQUIRE_CUTLASS": "1"}
            return [(cmd, env)]
        if name == "reach":
            return [(reach + ["--kernels-json", logs / "reach_kernels.json"], {})]
        if name in SANITIZER_TOOLS:
            exe = self.sanitizer or "compute-sanitizer"
            cmd = [exe, "--tool", name, "--error-exitcode", "1", "--print-limit", "50"]
            cmd += ["--log-file", logs / f"{name}.sanitizer.log"]
            if name in ("racecheck", "synccheck"):
                # initcheck needs every kernel instrumented: a torch kernel's writes that it did
                # not see read as uninitialized (50 such reports on the H200, 2026-11-30)
                cmd += ["--kernel-name", OWN_KERNELS]
            # racecheck and initcheck cost ~10x memcheck's time: the lowest rank of each tile
            lowest = ["--lowest"] if name in ("racecheck", "initcheck") else []
            cmd += reach + ["--quick", "--no-profile"] + lowest
            return [(cmd, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})]
        if name == "bench":
            cmd = [PYTHON, "bench/run.py", "--device", "cuda", "--repeats", "20"]
            return [(cmd + ["--out", logs / "bench"], {})]
        raise ValueError(name)

    def selected(self) -> list[Step]:
        return [s for s in STEPS if s.name in self.args.steps]

    def plan_text(self) -> str:
        lines = [
            f"lowrank_ext GPU check: {len(self.selected())} steps, stops starting steps at "
            f"{self.args.deadline:.0f}s; logs in {self.logs}",
            f"CUDA toolkit: {self.cuda_home or 'not found'}; "
            f"compute-sanitizer: {self.sanitizer or 'not found'}",
            "CUTLASS wheel: "
            + str(self.cutlass_wheel or "none (nvidia-cutlass installed, or CUTLASS_PATH)"),
        ]
        for step in self.selected():
            what = step.what
            if step.name == "build" and self.args.skip_build:
                what = "--skip-build: only check build_info() of the lowrank_ext already built"
            lines.append(f"\n[{step.name}] limit {step.budget_s}s: {what}")
            if step.needs:
                lines.append(f"  needs: {', '.join(step.needs)}")
            for cmd, env in self.commands(step.name):
                prefix = " ".join(f"{k}={v}" for k, v in env.items())
                words = ["<python code>" if "\n" in str(c) else str(c) for c in cmd]
                lines.append(f"  $ {prefix + ' ' if prefix else ''}{' '.join(words)}")
        lines.append("")
        lines.append(cuda_reach.tile_map_text(cuda_reach.SM90_OPTIN_SMEM, "sm_90: H100, H200"))
        lines.append(cuda_reach.tile_map_text(cuda_reach.SM80_OPTIN_SMEM, "sm_80: A100"))
        return "\n".join(lines)

    # -- running

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def run(self) -> list[Result]:
        shutil.rmtree(self.logs, ignore_errors=True)  # no log of an earlier run gets packed
        self.logs.mkdir(parents=True)
        (self.out / "plan.txt").write_text(self.plan_text() + "\n")
        results: dict[str, Result] = {}
        for step in self.selected():
            missing = [n for n in step.needs if n in results and results[n].status != "PASS"]
            limit = min(step.budget_s, self.remaining())
            elapsed = f"[{time.monotonic() - self.start:5.0f}s]"
            if missing:
                res = Result(step.name, "SKIP", detail=f"needs {', '.join(missing)}")
            elif limit < 5:
                res = Result(step.name, "SKIP", detail="no time left before the deadline")
            else:
                print(f"{elapsed} {step.name}: {step.what} (limit {limit:.0f}s)", flush=True)
                res = self.run_step(step, limit)
            results[step.name] = res
            print(f"{' ' * len(elapsed)} {step.name}: {res.status} {res.detail}", flush=True)
        return list(results.values())

    def run_step(self, step: Step, limit: float) -> Result:
        log = self.logs / f"{step.name}.log"
        res = Result(step.name, "FAIL", limit_s=round(limit), log=str(log.relative_to(self.out)))
        start = time.monotonic()
        try:
            getattr(self, f"step_{step.name}")(res, log, start + limit)
        except Exception as exc:  # a bug here must not lose the other steps
            res.status, res.detail = "FAIL", f"gpu_check error: {type(exc).__name__}: {exc}"
            with open(log, "a") as f:
                f.write(f"\n# gpu_check error: {exc!r}\n")
        res.seconds = round(time.monotonic() - start, 1)
        return res

    def run_commands(self, res: Result, log: Path, end: float, cmds) -> bool:
        """Run cmds in order into one log until one fails; record the outcome in res."""
        for i, (cmd, env) in enumerate(cmds):
            rc, _ = run_logged(cmd, log, end - time.monotonic(), env, append=i > 0)
            res.rc = rc
            if rc is None:
                res.status, res.detail = "TIMEOUT", f"killed at the limit: {short(cmd)}"
                return False
            if rc != 0:
                res.status, res.detail = "FAIL", f"exit {rc}: {short(cmd)}"
                error = last_error_line(log)
                if error:
                    res.detail += f"; {error}"
                return False
        res.status = "PASS"
        return True

    def probe_device(self, end: float) -> None:
        """What torch says of the device, from a child process (this one never touches CUDA)."""
        probe = capture([PYTHON, "-c", DEVICE_PROBE], timeout=max(end - time.monotonic(), 5))
        match = re.search(r"^DEVICE_JSON (.*)$", probe, re.M)
        self.device = json.loads(match.group(1)) if match else {"probe_error": probe}

    def step_env(self, res: Result, log: Path, end: float) -> None:
        self.probe_device(end)
        nvcc = (self.cuda_home / "bin" / "nvcc") if self.cuda_home else "nvcc"
        sections = {
            "date": now(),
            "host": f"{platform.node()} {platform.platform()}, {os.cpu_count()} cores",
            "python": f"{sys.version.split()[0]} at {PYTHON}",
            "git": capture(["git", "log", "-1", "--oneline"])
            + "\n"
            + capture(["git", "status", "--short"]),
            "packages": capture([PYTHON, "-m", "pip", "list", "--disable-pip-version-check"]),
            "CUDA toolkit": str(self.cuda_home),
            "nvcc --version": capture([nvcc, "--version"]),
            "compute-sanitizer": f"{self.sanitizer}: "
            + (capture([self.sanitizer, "--version"]) if self.sanitizer else "not found"),
            "nvidia-smi": capture(["nvidia-smi"]),
            "device (torch)": json.dumps(self.device, indent=1),
        }
        if not self.device.get("cuda_available"):
            res.status, res.detail = "FAIL", "torch sees no CUDA device"
        else:
            major, minor = self.device["capability"]
            self.arch = self.arch or f"{major}.{minor}"
            optin = self.device.get("optin_smem")
            source = "torch.cuda.get_device_properties"
            if not optin:
                optin = cuda_reach.OPTIN_SMEM_BY_CAPABILITY.get((major, minor))
                source = f"table for sm_{major}{minor}: torch's properties lack it"
            if optin:
                sections["SIMT tile map"] = cuda_reach.tile_map_text(optin, source)
            res.status = "PASS"
            res.detail = (
                f"{self.device['name']}, sm_{major}{minor}, {self.device['sm_count']} SMs, "
                f"torch {self.device['torch']} (CUDA {self.device['torch_cuda']})"
            )
        text = "\n\n".join(f"== {k}\n{v}" for k, v in sections.items())
        log.write_text(text + "\n")
        (self.out / "env.json").write_text(json.dumps(self.device, indent=1) + "\n")

    def step_build(self, res: Result, log: Path, end: float) -> None:
        if not self.arch and not self.device:  # no env step: ask the device for its arch
            self.probe_device(end)
        if not self.arch and self.device.get("capability"):
            self.arch = "{}.{}".format(*self.device["capability"])
        if not self.arch:
            res.detail = "no arch: torch sees no CUDA device (give --arch)"
            return
        if not self.args.skip_build and not self.cuda_home:
            res.detail = "no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) found"
            return
        if self.cutlass_wheel is not None and not self.cutlass_wheel.exists():
            res.detail = f"--cutlass-wheel {self.cutlass_wheel} does not exist"
            return
        if self.run_commands(res, log, end, self.commands("build")):
            res.detail = f"CUDA kernels built for {self.arch}" + (
                " (build skipped)" if self.args.skip_build else ""
            )

    def step_tests(self, res: Result, log: Path, end: float) -> None:
        self.run_commands(res, log, end, self.commands("tests"))
        counts = junit_counts(self.logs / "tests.xml")
        if counts:
            res.detail = (f"{counts} " + res.detail).strip()

    def step_reach(self, res: Result, log: Path, end: float) -> None:
        self.run_commands(res, log, end, self.commands("reach"))
        text = log.read_text(errors="replace")
        parts = re.findall(r"^(\d+ of \d+ cases passed)", text, re.M)[-1:]
        warnings = len(re.findall(r"^WARNING:", text, re.M))
        if warnings:
            parts.append(f"{warnings} warnings (see reach.log)")
        res.detail = "; ".join(parts + [res.detail] * bool(res.detail))

    def step_memcheck(self, res, log, end):
        self.sanitize("memcheck", res, log, end)

    def step_racecheck(self, res, log, end):
        self.sanitize("racecheck", res, log, end)

    def step_synccheck(self, res, log, end):
        self.sanitize("synccheck", res, log, end)

    def step_initcheck(self, res, log, end):
        self.sanitize("initcheck", res, log, end)

    def sanitize(self, tool: str, res: Result, log: Path, end: float) -> None:
        if not self.sanitizer:
            res.detail = "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)"
            return
        [(cmd, env)] = self.commands(tool)
        if "--kernel-name" in cmd and "--kernel-name" not in capture([self.sanitizer, "--help"]):
            i = cmd.index("--kernel-name")
            cmd = cmd[:i] + cmd[i + 2 :]  # an older compute-sanitizer: check every kernel
        self.run_commands(res, log, end, [(cmd, env)])
        report = self.logs / f"{tool}.sanitizer.log"
        text = report.read_text(errors="replace") if report.exists() else ""
        verdict = sanitizer_verdict(text + "\n" + log.read_text(errors="replace"))
        if verdict["errors"] is None:
            res.status = "FAIL" if res.status == "PASS" else res.status
            res.detail = "no ERROR SUMMARY: the tool did not finish; " + res.detail
            return
        if verdict["errors"] > 0:
            res.status = "FAIL"
        first = f"; first: {verdict['first']}" if verdict["first"] else ""
        hazards = f", {verdict['warnings']} race warnings" if verdict["warnings"] else ""
        res.detail = f"{verdict['errors']} errors{hazards}{first}" + (
            f"; {res.detail}" if res.status != "PASS" and res.detail else ""
        )

    def step_bench(self, res: Result, log: Path, end: float) -> None:
        if self.run_commands(res, log, end, self.commands("bench")):
            res.detail = "results in logs/bench/results.json"

    # -- the end

    def finish(self, results: list[Result]) -> int:
        ok = all(r.status == "PASS" for r in results)
        summary = {
            "overall": "PASS" if ok else "FAIL",
            "finished": now(),
            "total_s": round(time.monotonic() - self.start, 1),
            "deadline_s": self.args.deadline,
            "device": self.device,
            "arch": self.arch,
            "argv": sys.argv,
            "steps": [dataclasses.asdict(r) for r in results],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        tails = failure_tails(self.out, results)
        table = summary_table(results, summary)
        (self.out / "summary.txt").write_text(tails + table + "\n")
        archive = self.out / "gpu_check_logs.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
            for name in ("plan.txt", "env.json", "summary.json"):
                if (self.out / name).exists():
                    tar.add(self.out / name, arcname=name)
        if self.prune():
            shutil.rmtree(self.logs)
            (self.out / "plan.txt").unlink(missing_ok=True)
            (self.out / "env.json").unlink(missing_ok=True)
        print(tails + table)
        print(f"logs: {archive}")
        return 0 if ok else 1

    def prune(self) -> bool:
        if self.args.prune_logs != "auto":
            return self.args.prune_logs == "yes"
        out_env = os.environ.get("OUT")
        return bool(out_env) and Path(out_env).resolve() in (self.out, *self.out.parents)


def short(cmd) -> str:
    """A command for the table: python for the interpreter's path, code and long paths cut."""
    words = ["python" if str(c) == PYTHON else str(c) for c in cmd[:6]]
    return " ".join("<code>" if "\n" in w else w for w in words)


def last_error_line(log: Path) -> str:
    """The last line of the log's end that names an error, else its last line (for the table)."""
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()[-300:]
        if line.strip() and not line.startswith("#")
    ]
    for line in reversed(lines):
        if re.search(r"\b(error|Error|ERROR|FAILED|Traceback)\b", line):
            return line[:160]
    return lines[-1][:160] if lines else ""


def junit_counts(path: Path) -> str:
    if not path.exists():
        return ""
    head = path.read_text(errors="replace")[:2000]
    m = re.search(r"<testsuite\b[^>]*>", head)
    if not m:
        return ""
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    n = {k: int(attrs.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def sanitizer_verdict(text: str) -> dict:
    """Errors from compute-sanitizer's report (None: no summary line), race warnings, and the
    first reported problem."""
    summaries = re.findall(r"ERROR SUMMARY: (\d+) errors?", text)
    race = re.findall(
        r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text
    )
    errors = max(map(int, summaries)) if summaries else None
    if race:
        errors = max(errors or 0, max(int(e) for e, _ in race))
    warnings = max((int(w) for _, w in race), default=0)
    first = next(
        (
            line.strip("= ").strip()
            for line in text.splitlines()
            if line.startswith("=========")
            and re.search(r"Invalid|Error|Race|Uninitialized|Barrier|hazard", line)
            and "SUMMARY" not in line
        ),
        "",
    )
    return {"errors": errors, "warnings": warnings, "first": first[:200]}


def failure_tails(out: Path, results: list[Result], lines: int = 30) -> str:
    parts = []
    for r in results:
        if r.status in ("PASS", "SKIP") or not r.log or not (out / r.log).exists():
            continue
        tail = (out / r.log).read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"---- {r.name} ({r.status}): last {len(tail)} lines of {r.log}\n")
        parts.append("\n".join(tail) + "\n")
    return "".join(parts) + ("\n" if parts else "")


def summary_table(results: list[Result], summary: dict) -> str:
    rows = [f"{'step':<10} {'status':<7} {'time':>7} {'limit':>6}  detail"]
    for r in results:
        limit = f"{r.limit_s:.0f}s" if r.limit_s else "-"
        rows.append(f"{r.name:<10} {r.status:<7} {r.seconds:6.1f}s {limit:>6}  {r.detail}")
    rows.append(
        f"{'overall':<10} {summary['overall']:<7} {summary['total_s']:6.1f}s "
        f"{summary['deadline_s']:5.0f}s  {summary['device'].get('name', 'no device')}"
    )
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check", help="log folder")
    p.add_argument(
        "--steps",
        nargs="+",
        choices=STEP_NAMES,
        default=list(STEP_NAMES),
        metavar="STEP",
        help=f"a subset of {', '.join(STEP_NAMES)} (run in that order)",
    )
    p.add_argument(
        "--skip-build",
        action="store_true",
        help="use the lowrank_ext already built (the build step only checks its build_info)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST (default: the device's capability)")
    p.add_argument(
        "--cutlass-wheel",
        type=Path,
        help="the nvidia-cutlass wheel to install before the build (no network needed; default "
        f"{DEFAULT_CUTLASS_WHEEL.relative_to(ROOT)} when it exists)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help=f"seconds after which no step starts or runs on (default {DEFAULT_DEADLINE_S})",
    )
    p.add_argument(
        "--prune-logs",
        choices=["auto", "yes", "no"],
        default="auto",
        help="remove the loose logs once packed (auto: when --out lies under $OUT)",
    )
    args = p.parse_args(argv)
    args.steps = [s for s in STEP_NAMES if s in args.steps]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args)
    if args.dry_run:
        print(check.plan_text())
        print("\n(dry run: nothing was run)")
        return 0
    return check.finish(check.run())


if __name__ == "__main__":
    sys.exit(main())
