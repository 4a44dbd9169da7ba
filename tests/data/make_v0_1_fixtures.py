"""Writes the v0_1_*.pt fixtures of tests/test_layout.py; run once with lowrank_ext 0.1 (the flat
layout, commit 5975897), from outside the source tree:

    python tests/data/make_v0_1_fixtures.py tests/data

v0_1_model.pt pickles the modules whole, so it names their classes by the 0.1 module paths
(lowrank_ext.nn.LowRankLinear, lowrank_ext.conv.LowRankConv2d,
lowrank_ext.attention.LowRankMultiheadAttention); v0_1_state_dict.pt is their state_dict;
v0_1_outputs.pt holds inputs and the outputs 0.1 computed from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lowrank_ext import LowRankConv2d, LowRankLinear, LowRankMultiheadAttention


def modules() -> nn.ModuleDict:
    torch.manual_seed(0)
    grown = LowRankLinear(7, 6, 1)
    grown.grow(2, freeze_scales=True, scale_init=0.1)  # rank 3: 1 frozen (with its scale), 2 active
    capped = LowRankLinear(3, 4, 2)
    capped.grow(1)
    capped.freeze()  # at full rank, everything frozen: U and V are None
    conv_grown = LowRankConv2d(2, 3, (1, 2), 1, padding_mode="circular", padding=1)
    conv_grown.grow(1, scale_init=0.2)
    return nn.ModuleDict(
        {
            "linear": LowRankLinear(6, 5, 2),
            "full": LowRankLinear(6, 5, 3, bias=False, core="full"),
            "grown": grown,
            "capped": capped,
            "conv": LowRankConv2d(2, 4, 3, 2, padding=1),
            "conv_grown": conv_grown,
            "attention": LowRankMultiheadAttention(8, 2, 3),
            "attention_kv": LowRankMultiheadAttention(8, 2, 2, kdim=5, vdim=6, batch_first=True),
        }
    )


def inputs() -> dict[str, tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    query = randn(4, 2, 8)
    return {
        "linear": (randn(3, 6),),
        "full": (randn(3, 6),),
        "grown": (randn(3, 7),),
        "capped": (randn(3, 3),),
        "conv": (randn(2, 2, 5, 5),),
        "conv_grown": (randn(2, 2, 4, 4),),
        "attention": (query, query, query),
        "attention_kv": (randn(2, 4, 8), randn(2, 3, 5), randn(2, 3, 6)),
    }


def outputs(model: nn.ModuleDict, args: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        results = {name: model[name](*args[name]) for name in args}
    return {name: out[0] if isinstance(out, tuple) else out for name, out in results.items()}


def main(directory: Path) -> None:
    model = modules()
    args = inputs()
    torch.save(model, directory / "v0_1_model.pt")
    torch.save(model.state_dict(), directory / "v0_1_state_dict.pt")
    torch.save({"inputs": args, "outputs": outputs(model, args)}, directory / "v0_1_outputs.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
