"""The memory floor of the fused op: its compulsory traffic over the measured copy bandwidth.

Forward reads x and writes y once; backward reads dy and x and writes dx once (DESIGN.md,
"Performance"). Parameters (O((in+out)·r)) and t = x V (O(B·r)) are left out: they are small
next to the activations at the benchmark shapes.
"""

from __future__ import annotations

import torch
from cases import Shape
from timing import measure, summarize


def floor_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    elt = torch.empty((), dtype=dtype).element_size()
    b, n, m = shape.batch, shape.in_features, shape.out_features
    forward = b * (n + m)  # x read, y written
    backward = b * (m + n + n)  # dy read, x read, dx written
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
