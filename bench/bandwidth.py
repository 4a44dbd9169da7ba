"""The memory floor of the fused op: its compulsory traffic over the measured copy bandwidth.

Counted (floor_bytes), each tensor once per pass that must read or write it (DESIGN.md,
"Performance"):
- forward: x, U, S, V and bias read; y written;
- backward: dy, x, U, S and V read; dx, dU, dS, dV and dbias written.
fwd+bwd is the sum. The factors matter at small batch, where they are most of the bytes (at B=1
nearly all); at B=4096 they are a few percent. Not counted: t = x V (B·r, an intermediate that
may be recomputed or kept in cache) and any re-reads a kernel makes by choice.

The bandwidth is a DRAM copy's. Small rows run with their inputs and factors warm in cache
(timing.py), so "% floor" there can exceed 100 %: it means the data came from cache, not that
the floor is wrong.
"""

from __future__ import annotations

import torch
from cases import Shape
from timing import measure, summarize


def floor_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    b, n, m, r = shape.batch, shape.in_features, shape.out_features, shape.rank
    factors = m * r + (r if shape.core == "diag" else r * r) + n * r + m  # U, S, V, bias
    forward = b * (n + m) + factors  # x, factors read; y written
    backward = b * (m + n + n) + 2 * factors  # dy, x, factors read; dx, their gradients written
    return elt * (forward if pass_ == "fwd" else forward + backward)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Device-copy bandwidth, (bytes read + bytes written) / time of dst.copy_(src), median.

    1 GiB each way is far past any cache; on CPU a quarter of that is enough and quicker.
    """
    if device.type != "cuda":
        nbytes //= 4
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)  # allocated and touched once, so no page faults are timed
    dst.copy_(src)
    times = measure({"copy": lambda _: dst.copy_(src)}, 1, device, warmup=2, repeats=repeats)
    stats = summarize(times["copy"])
    stats["bytes"] = 2 * nbytes
    stats["bytes_per_s"] = 2 * nbytes / stats["median_s"]
    return stats
