"""Check an installed lowrank_ext wheel from the environment it is installed in (no GPU needed).

    python tools/check_wheel.py installed cpu
    python tools/check_wheel.py installed cuda --archs "8.0;8.6;8.9;9.0+PTX"
    python tools/check_wheel.py refuses               # built for another torch: clear ImportError
    python tools/check_wheel.py refuses --cpu-only-torch

`installed`: lowrank_ext is imported from site-packages (not a source tree) and holds every
Python module of the source tree's lowrank_ext/ (its sub-packages included); its version carries
the label for the running torch; every op has CPU kernels, and CUDA kernels exactly when the
wheel is a CUDA one; a CUDA wheel holds a cubin of every csrc/cuda/*.cu for every listed arch
and PTX for the +PTX one (read with cuobjdump), build_info() says it has the tensor-core kernels,
and their SASS holds tensor-core instructions (HMMA) for every listed arch (sm_80's mma.sync code,
the same on sm_86/89/90); the CPU kernel agrees with the reference.

`refuses`: importing lowrank_ext in a fresh interpreter fails with an ImportError that names what
the build needs and what is installed; never an undefined symbol, a missing library or a crash.
With --cpu-only-torch, torch.version.cuda is set to None first, standing in for a CPU-only torch
of the same release (the case where a CUDA wheel meets a CPU build of the torch it was made for).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def fail(message: str) -> None:
    sys.exit(f"check_wheel: FAILED: {message}")


def expected_label(torch, kind: str) -> str:
    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    backend = "cpu" if kind == "cpu" else "cu" + torch.version.cuda.replace(".", "")
    return f"{backend}.torch{torch_minor}"


def lowrank_ops_with_kernel(torch, key: str) -> set[str]:
    return {
        name
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
        if name.startswith("lowrank_ext::")
    }


def find_cuobjdump() -> str:
    # CUDA toolkits ship cuobjdump; where one lacks it, the CUDA build of torch brings one (triton).
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    candidates = sorted(Path(triton.__file__).parent.rglob("cuobjdump"))
    if not candidates:
        fail("no cuobjdump on PATH nor in triton; install a CUDA toolkit or give --cuobjdump")
    return str(candidates[0])


def check_cubins(library: Path, archs: str, cuobjdump: str) -> None:
    elves = subprocess.run(
        [cuobjdump, "--list-elf", str(library)], capture_output=True, text=True, check=True
    ).stdout
    ptx = subprocess.run(
        [cuobjdump, "--list-ptx", str(library)], capture_output=True, text=True, check=True
    ).stdout
    sources = sorted(p.stem for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        fail(f"no CUDA sources in {ROOT / 'csrc' / 'cuda'}")
    for arch in archs.split(";"):
        sm = "sm_" + arch.removesuffix("+PTX").replace(".", "")
        for stem in sources:
            if f"{stem}.{sm}.cubin" not in elves:
                fail(f"{library.name} has no {sm} cubin of {stem}.cu; cuobjdump lists:\n{elves}")
            if arch.endswith("+PTX") and f"{stem}.{sm}.ptx" not in ptx:
                fail(f"{library.name} has no {sm} PTX of {stem}.cu; cuobjdump lists:\n{ptx}")
    print(f"cubins for {archs} of {', '.join(s + '.cu' for s in sources)}:")
    print(elves + ptx, end="")


# csrc/cuda/linear_tensorcore.cu's kernels (the forward and the backward's first pass); HMMA is
# the SASS of their mma.sync m16n8k16.
TENSORCORE_KERNELS = ("linear_forward_tc_kernel", "linear_grad_g_tc_kernel")


def check_tensorcore_sass(library: Path, archs: str, cuobjdump: str) -> None:
    """Every listed arch's cubin holds each tensor-core kernel, with HMMA in every instance."""
    for arch in archs.split(";"):
        sm = "sm_" + arch.removesuffix("+PTX").replace(".", "")
        sass = subprocess.run(
            [cuobjdump, "-sass", "-arch", sm, str(library)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        functions = sass_by_function(sass)
        for kernel in TENSORCORE_KERNELS:
            bodies = {name: body for name, body in functions.items() if kernel in name}
            if not bodies:
                fail(f"{library.name}: no {kernel} in the {sm} SASS")
            without = [name for name, body in bodies.items() if "HMMA" not in body]
            if without:
                fail(f"{library.name}: {sm} SASS of {without[0]} holds no HMMA instruction")
            hmma = sum(body.count("HMMA") for body in bodies.values())
            print(f"{sm}: {len(bodies)} {kernel} instances, {hmma} HMMA instructions")


def sass_by_function(sass: str) -> dict[str, str]:
    """{mangled name: its SASS} of a cuobjdump -sass listing."""
    functions, name, body = {}, None, []
    for line in sass.splitlines():
        if "Function : " in line:
            if name:
                functions[name] = "\n".join(body)
            name, body = line.split("Function : ", 1)[1].strip(), []
        elif name:
            body.append(line)
    if name:
        functions[name] = "\n".join(body)
    return functions


def installed(kind: str, archs: str, cuobjdump: str | None) -> None:
    import torch

    import lowrank_ext

    package = Path(lowrank_ext.__file__).resolve().parent
    site = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    if package.parent not in site:
        fail(f"lowrank_ext was imported from {package}, not from site-packages {sorted(site)}")
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lowrank_ext").rglob("*.py")}
    shipped = {p.relative_to(package.parent).as_posix() for p in package.rglob("*.py")}
    if sources - shipped:  # e.g. a sub-package that pyproject's package list does not find
        fail(f"the wheel lacks the package's modules {sorted(sources - shipped)}")
    version = importlib.metadata.version("lowrank_ext")
    wanted = f"{lowrank_ext.__version__}+{expected_label(torch, kind)}"
    if version != wanted:
        fail(f"installed version {version}, expected {wanted} for torch {torch.__version__}")

    cpu_ops = lowrank_ops_with_kernel(torch, "CPU")
    cuda_ops = lowrank_ops_with_kernel(torch, "CUDA")
    if not cpu_ops:
        fail("no lowrank_ext op has a CPU kernel")
    if kind == "cuda" and cuda_ops != cpu_ops:
        fail(f"ops without a CUDA kernel: {sorted(cpu_ops - cuda_ops)}")
    if kind == "cpu" and cuda_ops:
        fail(f"a CPU wheel registers CUDA kernels: {sorted(cuda_ops)}")
    info = lowrank_ext.build_info()
    if info["cuda_kernels"] != (kind == "cuda"):
        fail(f"build_info() says cuda_kernels={info['cuda_kernels']} for a {kind} wheel")
    if kind == "cuda":
        if info["cuda_archs"] != archs.split(";"):
            fail(f"build_info() lists archs {info['cuda_archs']}, expected {archs.split(';')}")
        if not info.get("tensorcore_kernels"):
            fail("build_info(): the CUDA wheel has no tensor-core kernels (built without CUTLASS)")
        (library,) = package.glob("_C*.so")
        cuobjdump = cuobjdump or find_cuobjdump()
        check_cubins(library, archs, cuobjdump)
        check_tensorcore_sass(library, archs, cuobjdump)

    generator = torch.Generator().manual_seed(0)
    x, U, V = (torch.randn(shape, generator=generator) for shape in ((5, 9), (7, 3), (9, 3)))
    S, bias = torch.rand(3, generator=generator), torch.randn(7, generator=generator)
    torch.testing.assert_close(
        lowrank_ext.linear(x, U, S, V, bias), lowrank_ext.reference.linear(x, U, S, V, bias)
    )
    print(f"lowrank_ext {version} from {package}: ops {sorted(cpu_ops)}")
    print(f"build_info: {info}")


REFUSE = """
import torch
if {cpu_only_torch}:
    torch.version.cuda = None
try:
    import lowrank_ext
except ImportError as err:
    print(err)
    raise SystemExit(3)
print("imported", lowrank_ext.__file__)
"""


def refuses(cpu_only_torch: bool) -> None:
    result = subprocess.run(
        [sys.executable, "-c", REFUSE.format(cpu_only_torch=cpu_only_torch)],
        capture_output=True,
        text=True,
        cwd="/",
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 3:
        fail(f"import lowrank_ext should raise ImportError, exited {result.returncode}:\n{output}")
    needed = ["lowrank_ext was built", "install the lowrank_ext wheel labelled +"]
    needed.append("is a CPU-only build" if cpu_only_torch else "is installed")
    missing = [text for text in needed if text not in output]
    if missing or "undefined symbol" in output or "cannot open shared object" in output:
        fail(f"unclear refusal (lacks {missing}):\n{output}")
    print(f"refused as expected: {output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("installed", help="check the wheel installed here")
    check.add_argument("kind", choices=["cpu", "cuda"])
    check.add_argument("--archs", default=DEFAULT_ARCHS, help="the TORCH_CUDA_ARCH_LIST built")
    check.add_argument("--cuobjdump", help="cuobjdump to use (default: PATH, then triton's)")
    refuse = commands.add_parser("refuses", help="check import fails clearly (wrong torch)")
    refuse.add_argument("--cpu-only-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "installed":
        installed(args.kind, args.archs, args.cuobjdump)
    else:
        refuses(args.cpu_only_torch)
    print("check_wheel: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
