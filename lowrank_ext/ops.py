"""Functional API: the custom ops, their fake (meta) implementations and the CUDA kernel switch.

`linear` is `torch.ops.lowrank_ext.linear`. Its autograd is C++ (csrc/autograd/): with gradients
it runs `linear_forward` (returns y and the saved t = x V) and, in backward, the fused
`linear_backward` op; without gradients it goes straight to the backend kernel. `project_out`
likewise runs `project_out_forward` (Y and the float64 Gram–Schmidt coefficients and norms) and
`project_out_backward`. Python holds only what torch.compile and torch.export need (the fake
implementations) and the process-wide choice of CUDA kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ._extension import load

BUILD_CONFIG = load()
from ._C import (  # noqa: E402  (loaded by load())
    _cpu_buffer_cache,
    _cpu_gemm,
    _cuda_kernels,
    _empty_cpu_buffer_cache,
    _set_cuda_kernels,
    _tensorcore_kernels,
)

_ops = torch.ops.lowrank_ext
_cpu_buffer_cache()  # reads LOWRANK_EXT_CPU_CACHE_MB now: a bad value fails here, named
# Bound once: the op's own overload, so a call costs one Python frame before C++.
_linear = _ops.linear.default
_project_out = _ops.project_out.default

CUDA_KERNELS = ("cublas", "fused", "tensorcore")
CUDA_KERNELS_ENV = "LOWRANK_EXT_CUDA_KERNELS"


def set_cuda_kernels(name: str) -> None:
    """Choose the CUDA kernels of `linear` for this process (every device, every thread).

    Args:
        name: "cublas" (the default) — cuBLAS GEMMs composed inside the op: tensor cores on
            every architecture, cuBLAS's own accumulation; or "fused" — the SIMT kernels of
            csrc/cuda/linear.cu (one pass over x per tile, no tensor cores; opt-in, see README
            "CUDA kernels"); or "tensorcore" — the forward on the mma.sync back-to-back-GEMM kernel
            of csrc/cuda/linear_tensorcore.cu for float16/bfloat16 and r <= 256, and the
            backward's first pass (g = dy U and dbias) on the same kernel (opt-in, not yet
            measured on a GPU); every other call, and the rest of the backward, runs "cublas".

    Both give the same results to rounding and the same saved tensors, so the choice may change
    between calls, also after torch.compile or CUDA-graph capture (a graph keeps the kernels it
    captured). CPU calls are unaffected. The environment variable LOWRANK_EXT_CUDA_KERNELS sets
    the choice at import.

    Raises:
        ValueError: name is not "cublas", "fused" or "tensorcore".
        RuntimeError: name is "tensorcore" but this build has no tensor-core kernels (built
            without CUDA, or without the CUTLASS headers); the message says which.
    """
    if name not in CUDA_KERNELS:
        raise ValueError(
            f"lowrank_ext.set_cuda_kernels: unknown CUDA kernels {name!r}; "
            f"expected one of {', '.join(map(repr, CUDA_KERNELS))}"
        )
    _set_cuda_kernels(name)


def cuda_kernels() -> str:
    """The CUDA kernels `linear` runs now: "cublas", "fused" or "tensorcore" (set_cuda_kernels)."""
    return _cuda_kernels()


@contextlib.contextmanager
def use_cuda_kernels(name: str) -> Iterator[None]:
    """Context manager: `set_cuda_kernels(name)` inside, the previous choice restored after.

    The choice is process-wide, not per thread: blocks entered by several threads at once
    restore each other's choices in whatever order they exit. Choose once, or from one thread.
    """
    previous = cuda_kernels()
    set_cuda_kernels(name)
    try:
        yield
    finally:
        set_cuda_kernels(previous)


def tensorcore_kernels() -> bool:
    """Whether this build holds the tensor-core kernels (a CUDA build that found CUTLASS)."""
    return _tensorcore_kernels()


def cpu_gemm() -> str:
    """How the CPU kernels multiply: "blas" (the BLAS inside libtorch, called directly) or
    "aten" (through at::addmm_out, where that libtorch exports no BLAS entry points)."""
    return _cpu_gemm()


def cpu_buffer_cache() -> dict:
    """The CPU kernels' cache of large buffers (csrc/cpu/output_alloc.h).

    Buffers of 256 KiB and more that the CPU kernels return (y, the saved t, every gradient,
    project_out's Y and dX) come from this cache; when such a tensor is freed, its memory is kept
    for the next call of the same size instead of going back to the OS, up to a limit
    (environment variable LOWRANK_EXT_CPU_CACHE_MB, read once at import: a whole number of MiB,
    default 256, 0 turns it off). A fresh buffer costs a page fault per 4 KiB on its first
    write, more than the GEMMs at small rank (bench/RESULTS.md).

    Returns {"cached_bytes", "limit_bytes", "hits", "misses"} (ints): bytes kept now, the limit,
    allocations served from the cache, allocations that mapped new memory.
    """
    return _cpu_buffer_cache()


def empty_cpu_buffer_cache() -> None:
    """Frees every buffer `cpu_buffer_cache` keeps (tensors in use are not touched)."""
    _empty_cpu_buffer_cache()


def _kernels_from_environment() -> None:
    # Unset or empty: the default. Case and surrounding blanks do not matter.
    name = os.environ.get(CUDA_KERNELS_ENV, "").strip().lower()
    if not name:
        return
    if name not in CUDA_KERNELS:
        raise ValueError(
            f"environment variable {CUDA_KERNELS_ENV}={name!r} names no CUDA kernels of "
            f"lowrank_ext; expected one of {', '.join(map(repr, CUDA_KERNELS))}"
        )
    set_cuda_kernels(name)


_kernels_from_environment()


def linear(
    x: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x V) Sᵀ) Uᵀ + bias without forming W = U S Vᵀ.

    Args:
        x: (..., in_features), any number of leading dims (a batch of 0 is fine).
        U: (out_features, r).
        S: (r,) for a diagonal core or (r, r) for a full core.
        V: (in_features, r).
        bias: (out_features,) or None.

    All tensors share one dtype (CPU: float32/float64; CUDA: also float16/bfloat16, accumulated
    in float32) and one device, and are dense (strided): sparse, quantized and nested tensors
    raise a RuntimeError naming the argument, as does any shape, dtype or device that does not
    fit. Under autocast, CUDA inputs are cast to the autocast dtype and CPU inputs to float32.
    Returns y of shape (..., out_features).
    """
    return _linear(x, U, S, V, bias)


def _check_fake_args(x, U, S, V, bias):
    # Shape checks at trace time (the kernels repeat them with the full message at run time).
    torch._check(x.dim() >= 1, lambda: "lowrank_ext.linear: argument 'x' must have at least 1 dim")
    torch._check(
        U.dim() == 2, lambda: f"lowrank_ext.linear: argument 'U' must be 2-D, got {U.dim()}-D"
    )
    torch._check(
        V.dim() == 2, lambda: f"lowrank_ext.linear: argument 'V' must be 2-D, got {V.dim()}-D"
    )
    r = U.shape[1]
    torch._check(V.shape[1] == r, lambda: "lowrank_ext.linear: 'U' and 'V' must share the rank")
    torch._check(
        V.shape[0] == x.shape[-1],
        lambda: (
            f"lowrank_ext.linear: argument 'V' must be ({x.shape[-1]}, rank), got {tuple(V.shape)}"
        ),
    )
    torch._check(
        S.shape in ((r,), (r, r)),
        lambda: (
            f"lowrank_ext.linear: argument 'S' must be ({r},) or ({r}, {r}), got {tuple(S.shape)}"
        ),
    )
    torch._check(
        bias is None or bias.shape == (U.shape[0],),
        lambda: f"lowrank_ext.linear: argument 'bias' must be ({U.shape[0]},)",
    )
    for name, other in (("U", U), ("S", S), ("V", V), ("bias", bias)):
        if other is None:
            continue
        torch._check(
            other.dtype == x.dtype,
            lambda name=name, other=other: (
                f"lowrank_ext.linear: argument '{name}' has dtype "
                f"{other.dtype} but x has dtype {x.dtype}"
            ),
        )
        torch._check(
            other.device == x.device,
            lambda name=name, other=other: (
                f"lowrank_ext.linear: argument '{name}' is on {other.device} but x is on {x.device}"
            ),
        )


# The dtype of the saved t = x V (csrc/linear.h, saved_t_dtype): float32 for half inputs.
_SAVED_T_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@torch.library.register_fake("lowrank_ext::linear")
def _linear_fake(x, U, S, V, bias=None):
    _check_fake_args(x, U, S, V, bias)
    return x.new_empty((*x.shape[:-1], U.shape[0]))


@torch.library.register_fake("lowrank_ext::linear_forward")
def _linear_forward_fake(x, U, S, V, bias, save_t):
    y = _linear_fake(x, U, S, V, bias)
    batch = 1
    for size in x.shape[:-1]:
        batch = batch * size
    t_dtype = _SAVED_T_DTYPE.get(x.dtype, x.dtype)
    t = x.new_empty((batch, U.shape[1]), dtype=t_dtype) if save_t else x.new_empty((0,))
    return y, t


def _check_same_device(op, ref_name, ref, **others):
    # A fake call with one meta argument among real ones must fail as the kernels would,
    # not return uninitialized "gradients".
    for name, other in others.items():
        torch._check(
            other.device == ref.device,
            lambda name=name, other=other: (
                f"{op}: argument '{name}' is on {other.device} but {ref_name} is on {ref.device}"
            ),
        )


def _check_output_mask(op, output_mask, names):
    torch._check(
        len(output_mask) == len(names),
        lambda: (
            f"{op}: argument 'output_mask' must have {len(names)} entries "
            f"({', '.join(names)}), got {len(output_mask)}"
        ),
    )


def _grad_transposed(factor: torch.Tensor) -> bool:
    # csrc/linear.h grad_transposed: a column-major factor gets a column-major gradient.
    return (
        factor.dim() == 2
        and factor.shape[0] > 1
        and factor.shape[1] > 1
        and factor.stride(0) == 1
        and factor.stride(1) == factor.shape[0]
    )


@torch.library.register_fake("lowrank_ext::linear_backward")
def _linear_backward_fake(grad_y, x, t, U, S, V, output_mask):
    op = "lowrank_ext.linear_backward"
    _check_output_mask(op, output_mask, ("grad_x", "grad_U", "grad_S", "grad_V", "grad_bias"))
    _check_fake_args(x, U, S, V, None)
    _check_same_device(op, "x", x, grad_y=grad_y, t=t)
    batch = 1
    for size in x.shape[:-1]:
        batch = batch * size
    torch._check(
        t.shape == (0,) or t.shape == (batch, U.shape[1]),
        lambda: (
            f"{op}: argument 't' (the saved x V) must have shape ({batch}, {U.shape[1]}) or (0,) "
            f"when it was not saved, got {tuple(t.shape)}"
        ),
    )

    def grad_like(needed, like):
        if not needed:
            return like.new_empty((0,))
        if _grad_transposed(like):
            return like.new_empty((like.shape[1], like.shape[0])).t()
        return like.new_empty(like.shape)

    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
        grad_like(output_mask[1], U),
        grad_like(output_mask[2], S),
        grad_like(output_mask[3], V),
        U.new_empty((U.shape[0],)) if output_mask[4] else U.new_empty((0,)),
    )


# csrc/project_out.h: the most passes a call may ask for (two already reach working precision),
# and the fewest normalize=True needs.
MAX_PASSES = 8
MIN_NORMALIZE_PASSES = 2


def project_out(
    Q: torch.Tensor, X: torch.Tensor, passes: int = 2, normalize: bool = False
) -> torch.Tensor:
    """Y = X − Q(QᵀX), applied `passes` times; with `normalize`, columns scaled to unit norm.

    Args:
        Q: (n, k) with orthonormal columns (k may be 0). Orthonormality is assumed, not checked
            (that would cost O(n k²)).
        X: (n, p), same dtype and device as Q.
        passes: Gram–Schmidt passes, 1 to MAX_PASSES (8); 1 is classical Gram–Schmidt, the
            default 2 (CGS2) leaves Y orthogonal to span(Q) to working precision even when X is
            close to span(Q). More passes only help a Q orthonormal to less than working
            precision.
        normalize: scale each column of Y to unit norm; needs passes ≥ 2 (after one pass, a
            column in span(Q) keeps Q's own rounding error, which no test can tell from a
            component outside span(Q)). A column that is zero or lies in span(Q) to working
            precision, ‖y‖ ≤ 4·(eps + √max(k, 1)·2⁻⁵²)·‖x‖ (eps of the dtype: the rounding of x
            and Q; √k·2⁻⁵²: that of this op's float64 sums), raises a RuntimeError naming it, as
            does one whose norm is not finite; without normalize NaN/Inf propagate.

    Returns:
        Y of shape (n, p), X's dtype and device.

    float32 and float64 only, on CPU and CUDA: every sum is accumulated in float64 and no
    TF32/half-precision matmul is used, whatever torch's precision settings. Under autocast,
    half inputs are computed in float32. Differentiable in Q and X (fused backward).

    Raises:
        RuntimeError: naming the argument, for a shape, dtype or device that does not fit, a
            sparse, quantized or nested tensor, passes outside [1, 8] (or 1 with normalize),
            and the columns normalize refuses.
    """
    return _project_out(Q, X, passes, normalize)


def _check_project_out_fake_args(Q, X, passes, normalize):
    op = "lowrank_ext.project_out"
    torch._check(X.dim() == 2, lambda: f"{op}: argument 'X' must be 2-D (n, p), got {X.dim()}-D")
    torch._check(Q.dim() == 2, lambda: f"{op}: argument 'Q' must be 2-D (n, k), got {Q.dim()}-D")
    torch._check(
        X.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: argument 'X' has dtype {X.dtype}; float32 or float64 only",
    )
    torch._check(
        Q.dtype == X.dtype, lambda: f"{op}: argument 'Q' has dtype {Q.dtype} but X has {X.dtype}"
    )
    torch._check(
        Q.device == X.device, lambda: f"{op}: argument 'Q' is on {Q.device} but X is on {X.device}"
    )
    torch._check(
        Q.shape[0] == X.shape[0],
        lambda: f"{op}: argument 'Q' must be ({X.shape[0]}, k), got {tuple(Q.shape)}",
    )
    torch._check(
        1 <= passes <= MAX_PASSES,
        lambda: f"{op}: argument 'passes' must be in [1, {MAX_PASSES}], got {passes}",
    )
    torch._check(
        not normalize or passes >= MIN_NORMALIZE_PASSES,
        lambda: (
            f"{op}: argument 'passes' must be >= {MIN_NORMALIZE_PASSES} with normalize=True, "
            f"got {passes}"
        ),
    )


@torch.library.register_fake("lowrank_ext::project_out")
def _project_out_fake(Q, X, passes=2, normalize=False):
    _check_project_out_fake_args(Q, X, passes, normalize)
    return X.new_empty(X.shape)


@torch.library.register_fake("lowrank_ext::project_out_forward")
def _project_out_forward_fake(Q, X, passes, normalize):
    _check_project_out_fake_args(Q, X, passes, normalize)
    n, p = X.shape
    coeffs = X.new_empty((passes, Q.shape[1], p), dtype=torch.float64)
    norms = X.new_empty((p,) if normalize else (0,), dtype=torch.float64)
    return X.new_empty((n, p)), coeffs, norms


@torch.library.register_fake("lowrank_ext::project_out_backward")
def _project_out_backward_fake(grad_Y, Q, X, Y, coeffs, norms, passes, normalize, output_mask):
    op = "lowrank_ext.project_out_backward"
    _check_output_mask(op, output_mask, ("grad_Q", "grad_X"))
    _check_project_out_fake_args(Q, X, passes, normalize)
    _check_same_device(op, "X", X, grad_Y=grad_Y, Y=Y, coeffs=coeffs, norms=norms)
    for name, tensor in (("grad_Y", grad_Y), ("Y", Y)):
        torch._check(
            tensor.shape == X.shape,
            lambda name=name, tensor=tensor: (
                f"{op}: argument '{name}' has shape {tuple(tensor.shape)} but X has shape "
                f"{tuple(X.shape)}"
            ),
        )
    expected = {"coeffs": (passes, Q.shape[1], X.shape[1]), "norms": (X.shape[1] * normalize,)}
    for name, tensor in (("coeffs", coeffs), ("norms", norms)):
        torch._check(
            tensor.dtype == torch.float64 and tensor.shape == expected[name],
            lambda name=name, tensor=tensor: (
                f"{op}: argument '{name}' must be float64 of shape {expected[name]}, got "
                f"{tensor.dtype} of shape {tuple(tensor.shape)}"
            ),
        )
    grad_Q = Q.new_empty(Q.shape) if output_mask[0] else Q.new_empty((0,))
    grad_X = X.new_empty(X.shape) if output_mask[1] else X.new_empty((0,))
    return grad_Q, grad_X


# ---------------------------------------------------------------- tensors the kernels cannot read
#
# The kernels take dense (strided) tensors. For any other kind the dispatcher would look for a
# kernel under the tensor's backend key (SparseCPU, QuantizedCPU, ...) and fail with a message
# naming only the backend; these kernels answer instead, naming the argument and what to pass.
# Registered per dispatch key, they cost the dense path nothing and cover torch.ops.lowrank_ext.*
# as well as the wrappers above and the modules.

_NOT_DENSE_KEYS = (
    "SparseCPU",
    "SparseCUDA",
    "SparseCsrCPU",
    "SparseCsrCUDA",
    "QuantizedCPU",
    "QuantizedCUDA",
    "NestedTensorCPU",
    "NestedTensorCUDA",
    # The C++ autograd kernels read sizes, which a nested tensor does not have: answer before.
    "AutogradNestedTensor",
)
_OPS = (
    "linear",
    "linear_forward",
    "linear_backward",
    "project_out",
    "project_out_forward",
    "project_out_backward",
)


def tensor_kind(tensor: torch.Tensor) -> str | None:
    """What kind of tensor `tensor` is when the kernels cannot read it ("sparse_coo", "quantized",
    "nested", ...), and how to make a dense one; None for a dense (strided) tensor."""
    if tensor.is_nested:
        return "a nested tensor (pad it with torch.nested.to_padded_tensor, or unbind it)"
    if tensor.is_quantized:
        return f"a quantized tensor ({tensor.dtype}; .dequantize() gives a float one)"
    if tensor.layout != torch.strided:
        return (
            f"a {str(tensor.layout).removeprefix('torch.')} tensor (.to_dense() gives a dense one)"
        )
    return None


def _refuse_not_dense(op_name: str):
    schema = getattr(_ops, op_name).default._schema
    names = [argument.name for argument in schema.arguments]
    # linear and project_out with gradients run their _forward ops: name the op that was called.
    public = op_name.removesuffix("_forward")

    def refuse(*args, **kwargs):
        values = [*zip(names, args), *kwargs.items()]
        for name, value in values:
            kind = tensor_kind(value) if isinstance(value, torch.Tensor) else None
            if kind is not None:
                raise RuntimeError(
                    f"lowrank_ext.{public}: argument '{name}' is {kind}; the op takes dense "
                    "(strided) tensors"
                )
        raise RuntimeError(f"lowrank_ext.{public}: the arguments must be dense (strided) tensors")

    return refuse


_library = torch.library.Library("lowrank_ext", "IMPL")
for _op_name in _OPS:
    for _key in _NOT_DENSE_KEYS:
        _library.impl(_op_name, _refuse_not_dense(_op_name), _key)


def _refuse_jagged() -> None:
    """Jagged nested tensors (layout=torch.jagged) are a Python subclass that dispatches through
    its __torch_dispatch__, not through a backend key: refuse there too (torch's private class,
    so only when it is where torch 2.11–2.14 keep it)."""
    try:
        from torch.nested._internal.nested_tensor import NestedTensor
    except ImportError:  # pragma: no cover - another torch layout; torch's own error then
        return
    for op_name in _OPS:
        refuse = _refuse_not_dense(op_name)

        def dispatch(mode, func, types, args=(), kwargs=None, refuse=refuse):
            refuse(*args, **(kwargs or {}))

        torch.library.register_torch_dispatch(
            f"lowrank_ext::{op_name}", NestedTensor, dispatch, lib=_library
        )


_refuse_jagged()
