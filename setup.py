"""Build of lowrank_ext._C: CPU kernels always, CUDA kernels when they can be built.

CUDA is built when torch has CUDA and nvcc is found, or when FORCE_CUDA=1 (then a missing
toolkit is an error, never a silent CPU-only build). FORCE_CUDA=0 builds CPU kernels only.
TORCH_CUDA_ARCH_LIST defaults to sm_80, sm_86, sm_89 and sm_90 with PTX.
LOWRANK_LOCAL_VERSION=auto appends a PEP 440 local label naming what the binary needs, e.g.
0.1.0+cu130.torch2.14 or 0.1.0+cpu.torch2.13 (tools/build_wheel.py sets it); any other
non-empty value is used as the label itself.

The tensor-core kernels (csrc/cuda/linear_tensorcore.cu, lowrank_ext.set_cuda_kernels("tensorcore"))
need the CUTLASS 4.2 headers (cute/, cutlass/): CUTLASS_PATH (a CUTLASS checkout or its include
folder) or the installed `nvidia-cutlass==4.2.0.0` package. Without them a CUDA build leaves those
kernels out, says so at build time and in build_info()["tensorcore_kernels"];
LOWRANK_EXT_REQUIRE_CUTLASS=1 makes a missing CUTLASS a build error instead.

Build against the torch you already have: pip install --no-build-isolation -e .
"""

import os
import re
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's isolated build env has no torch: say how to build instead
    sys.exit(
        "lowrank_ext builds against the torch already installed; install torch first "
        "(e.g. `pip install torch==2.13.0`), then build with "
        "`pip install --no-build-isolation -e .`"
    )

ROOT = Path(__file__).resolve().parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "lowrank_ext" / "version.py").read_text()
).group(1)
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def build_with_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    nvcc = CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()
    if force == "0":
        return False
    if nvcc and torch.version.cuda and not Path(CUDA_HOME, "include", "cuda_runtime.h").exists():
        # torch takes CUDA_HOME from the nvcc on PATH; a wrapper script there points it at
        # a folder that is no toolkit, and the link would fail much later (-lcudart).
        raise RuntimeError(
            f"CUDA_HOME={CUDA_HOME} (guessed from the nvcc on PATH) holds no CUDA toolkit "
            "(include/cuda_runtime.h is missing); set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda"
        )
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of torch to compile the CUDA kernels"
            )
        if not nvcc:
            raise RuntimeError(
                "FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME to a CUDA toolkit"
            )
        return True
    return torch.version.cuda is not None and nvcc


def cutlass_include() -> Path | None:
    """The folder with the cute/ and cutlass/ headers: CUTLASS_PATH, else nvidia-cutlass's."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        root = Path(os.environ["CUTLASS_PATH"])
        candidates += [root / "include", root]
    else:
        import importlib.util

        # find_spec does not import the package (its Python side needs cuda-python).
        spec = importlib.util.find_spec("cutlass_library")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / "source" / "include")
    for folder in candidates:
        if (folder / "cute" / "arch" / "mma_sm80.hpp").exists() and (folder / "cutlass").is_dir():
            return folder
    if os.environ.get("LOWRANK_EXT_REQUIRE_CUTLASS") == "1":
        where = (
            f"CUTLASS_PATH={os.environ['CUTLASS_PATH']}"
            if os.environ.get("CUTLASS_PATH")
            else "the nvidia-cutlass package (not installed)"
        )
        raise RuntimeError(
            f"LOWRANK_EXT_REQUIRE_CUTLASS=1 but {where} holds no CUTLASS headers "
            "(cute/arch/mma_sm80.hpp); pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_PATH"
        )
    print(
        "lowrank_ext: no CUTLASS headers found (CUTLASS_PATH or pip install "
        "nvidia-cutlass==4.2.0.0); building the CUDA kernels without the tensor-core set",
        file=sys.stderr,
    )
    return None


def local_version_label(with_cuda: bool) -> str:
    """The wheel's local label: torch major.minor (the ABI the binary needs) and CUDA or cpu."""
    label = os.environ.get("LOWRANK_LOCAL_VERSION", "")
    if label == "auto":
        torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        backend = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
        label = f"{backend}.torch{torch_minor}"
    if label and not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):
        raise RuntimeError(
            f"LOWRANK_LOCAL_VERSION={label!r} is no PEP 440 local version label "
            "(lowercase letters and digits separated by dots), nor 'auto'"
        )
    return label


def sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def write_build_config(with_cuda: bool, archs: str) -> None:
    """Record what this build was made against; lowrank_ext checks it before loading _C."""
    (ROOT / "lowrank_ext" / "_build_config.py").write_text(
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs if with_cuda else ''!r}\n"
    )


with_cuda = build_with_cuda()
cxx_flags = ["-O3", "-fopenmp"]
link_flags = ["-fopenmp"]
cutlass = cutlass_include() if with_cuda else None
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cuda_sources = sources("csrc/cuda/*.cu")
    macros = [("LOWRANK_EXT_WITH_CUDA", "1")]
    if cutlass is None:
        cuda_sources.remove(str(Path("csrc", "cuda", "linear_tensorcore.cu")))
    else:
        macros.append(("LOWRANK_EXT_WITH_TENSORCORE", "1"))
    extension = CUDAExtension(
        "lowrank_ext._C",
        sources("csrc/*.cpp")
        + sources("csrc/autograd/*.cpp")
        + sources("csrc/cpu/*.cpp")
        + cuda_sources,
        include_dirs=[str(ROOT / "csrc")] + ([str(cutlass)] if cutlass else []),
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "lowrank_ext._C",
        sources("csrc/*.cpp") + sources("csrc/autograd/*.cpp") + sources("csrc/cpu/*.cpp"),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
write_build_config(with_cuda, os.environ.get("TORCH_CUDA_ARCH_LIST", ""))

label = local_version_label(with_cuda)

setup(
    version=f"{VERSION}+{label}" if label else VERSION,
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
