"""torch.compile (default and max-autotune) and torch.export of models built from low-rank modules.

test_module.py checks that one LowRankLinear model compiles; here every low-rank module goes
through both compile modes, forward and backward against eager, batch sizes that change without
a recompile, and an exported program with a dynamic batch dimension that runs, matches, survives
save/load and trains. A new module is one more entry in MODULES.
"""

import pytest
import torch
from torch import nn

from lowrank_ext import LowRankLinear

# (id, factory of a float64 module, per-sample input shape). Sizes stay tiny: compiling dominates.
MODULES = [
    ("linear-diag", lambda: LowRankLinear(16, 12, 4), (16,)),
    ("linear-full-nobias-seq", lambda: LowRankLinear(16, 12, 3, bias=False, core="full"), (5, 16)),
]
PARAMS = [pytest.param(factory, shape, id=name) for name, factory, shape in MODULES]
# Inductor reorders float64 pointwise math; a real error is O(1), far above this.
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _model(factory) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(factory(), nn.GELU()).double()


def _inputs(shape, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, dtype=torch.float64, generator=generator)


def _forward_backward(model: nn.Module, fn, x: torch.Tensor):
    """Output and parameter gradients (by name) of a loss that weighs every output differently."""
    model.zero_grad(set_to_none=True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same(result, expected):
    (y, grads), (y_expected, grads_expected) = result, expected
    torch.testing.assert_close(y, y_expected, **TOL)
    assert grads.keys() == grads_expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_expected[name], **TOL, msg=name)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
@pytest.mark.parametrize("factory, shape", PARAMS)
def test_compiled_forward_and_backward_match_eager(factory, shape, mode):
    model = _model(factory)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    x = _inputs(shape, batch=6)
    _assert_same(_forward_backward(model, compiled, x), _forward_backward(model, model, x))


@pytest.mark.parametrize("factory, shape", PARAMS)
def test_new_batch_sizes_do_not_recompile(factory, shape):
    model = _model(factory)
    compiled = torch.compile(model, fullgraph=True)
    first = _inputs(shape, batch=4)
    torch._dynamo.mark_dynamic(first, 0)
    _forward_backward(model, compiled, first)
    # Any recompile from here on raises instead of silently compiling again.
    with torch.compiler.set_stance("fail_on_recompile"):
        for batch in (2, 7, 33):
            x = _inputs(shape, batch, seed=batch)
            _assert_same(_forward_backward(model, compiled, x), _forward_backward(model, model, x))


def test_fail_on_recompile_stance_catches_a_recompile():
    # The test above relies on this stance raising; a static compile must trip it.
    model = _model(MODULES[0][1])
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
    compiled(_inputs((16,), batch=4))
    with (
        torch.compiler.set_stance("fail_on_recompile"),
        pytest.raises(RuntimeError, match="Detected recompile"),
    ):
        compiled(_inputs((16,), batch=5))


@pytest.mark.parametrize("factory, shape", PARAMS)
def test_export_with_dynamic_batch_runs_matches_and_reloads(factory, shape, tmp_path):
    model = _model(factory)
    batch = torch.export.Dim("batch", min=2, max=4096)
    program = torch.export.export(model, (_inputs(shape, batch=4),), dynamic_shapes=({0: batch},))
    assert any("lowrank_ext" in str(node.target) for node in program.graph.nodes)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    for size in (2, 9, 64):
        x = _inputs(shape, size, seed=size)
        expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, **TOL)
        torch.testing.assert_close(loaded.module()(x), expected, **TOL)


@pytest.mark.parametrize("factory, shape", PARAMS)
def test_exported_module_trains_like_eager(factory, shape):
    # The exported graph keeps the op's autograd: gradients through it match eager ones.
    model = _model(factory)
    x = _inputs(shape, batch=5)
    exported = torch.export.export(model, (x,)).module()
    _assert_same(_forward_backward(exported, exported, x), _forward_backward(model, model, x))
