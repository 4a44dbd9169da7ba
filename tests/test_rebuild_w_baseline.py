"""The rebuild-W baseline of bench/ computes the same function and gradients as lowrank_ext.

bench/test_oialr_bench.py times lowrank_ext's OIALR layers against bench/rebuild_w.py's; the
comparison means something only if both train the same model. Checked in float64: outputs, the
gradients of every trainable S and bias, and that U, V stay out of the optimizer's reach.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_ext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from rebuild_w import RebuildWConv2d, RebuildWLinear, rebuild_w_copy  # noqa: E402

TOL = {"rtol": 1e-10, "atol": 1e-10}


class _Attention(nn.Module):
    """Self-attention (in_proj called as a module) or cross-attention (its factors() read)."""

    def __init__(self, embed_dim: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.head = nn.Linear(embed_dim, 5)
        self.cross = cross

    def forward(self, x):
        memory = x.flip(1)[:, :-1] if self.cross else x
        out, _ = self.attention(x, memory, memory, need_weights=False)
        return self.head(out.mean(dim=1))


def _mlp():
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5)
    )


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding="valid", dilation=1),
        nn.ReLU(),
        nn.Conv2d(12, 6, 1, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


CASES = {
    "mlp": (_mlp, (9, 12), 4),
    "cnn": (_cnn, (4, 3, 8, 8), 3),
    "self_attention": (lambda: _Attention(16, 4), (3, 7, 16), 4),
    "cross_attention": (lambda: _Attention(16, 4, cross=True), (3, 7, 16), 4),
}


def _freeze_factors(model):
    for module in model.modules():
        if isinstance(module, (lowrank_ext.LowRankLinear, lowrank_ext.LowRankConv2d)):
            module.U.requires_grad_(False)
            module.V.requires_grad_(False)


@pytest.mark.parametrize("case", list(CASES))
def test_same_outputs_and_gradients(case):
    build, shape, rank = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    lowrank_ext.convert(model, rank=rank, core="full")
    _freeze_factors(model)
    baseline = rebuild_w_copy(model)

    swapped = [m for m in baseline.modules() if isinstance(m, (RebuildWLinear, RebuildWConv2d))]
    assert swapped, "nothing was converted"
    assert not any(
        isinstance(m, (lowrank_ext.LowRankLinear, lowrank_ext.LowRankConv2d))
        for m in baseline.modules()
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in baseline.named_parameters() if p.requires_grad] == trainable

    x = torch.randn(shape, dtype=torch.float64)
    target = torch.randint(0, 5, (shape[0],))
    outputs = []
    for net in (model, baseline):
        out = net(x)
        nn.functional.cross_entropy(out, target).backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    grads = dict(model.named_parameters())
    for name, param in baseline.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, **TOL, msg=name)


def test_source_model_untouched_and_factors():
    torch.manual_seed(0)
    model = _mlp().double()
    lowrank_ext.convert(model, rank=4, core="full")
    baseline = rebuild_w_copy(model)
    assert isinstance(model[0], lowrank_ext.LowRankLinear)
    U, S, V = baseline[0].factors()
    torch.testing.assert_close(U @ S @ V.T, model[0].weight.detach(), **TOL)
    assert "U" in dict(baseline[0].named_buffers()) and "U" not in dict(baseline.named_parameters())


def test_unsupported_is_refused():
    conv = lowrank_ext.LowRankConv2d(3, 4, 3, 2, padding=1, padding_mode="reflect", core="full")
    with pytest.raises(ValueError, match="padding_mode"):
        RebuildWConv2d.from_low_rank(conv)
    grown = lowrank_ext.LowRankLinear(8, 8, 2, core="diag")
    grown.grow(1)
    with pytest.raises(ValueError, match="frozen_rank"):
        RebuildWLinear.from_low_rank(grown)
    with pytest.raises(TypeError, match="LowRankLinear"):
        RebuildWLinear.from_low_rank(nn.Linear(3, 3))
