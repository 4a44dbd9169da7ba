"""Random inputs for the linear op: O(1) activations and factors scaled to O(1) outputs."""

import torch


def make_factors(
    batch_shape,
    in_features,
    out_features,
    rank,
    *,
    core="diag",
    bias=True,
    dtype=torch.float64,
    device="cpu",
    generator=None,
):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(
            device=device, dtype=dtype
        )

    x = randn(*batch_shape, in_features)
    U = randn(out_features, rank, scale=rank**-0.5)
    V = randn(in_features, rank, scale=max(in_features, 1) ** -0.5)
    S = randn(rank) if core == "diag" else randn(rank, rank, scale=rank**-0.5)
    b = randn(out_features) if bias else None
    return x, U, S, V, b


def as_float64(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]
