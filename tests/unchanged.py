"""A record of everything a failed call must leave as it was: modules, tensors, optimizer, outputs.

`record(model, optimizer, inputs)` notes, bit for bit, every module (name, type, object), every
parameter and buffer (object, bits, requires_grad, grad), the optimizer's param_groups (order,
settings) and state, and the model's outputs on `inputs`; `assert_unchanged` compares two.
"""

from __future__ import annotations

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: NaN, -0.0 and +0.0 compare by their bits."""
    tensor = tensor.detach().contiguous().clone()
    return tensor.view(_INT_OF_SIZE[tensor.element_size()])


def _outputs(model, inputs):
    if inputs is None:
        return None
    with torch.no_grad():
        out = model(*inputs)
    return [bits(t) for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


def record(model, optimizer=None, inputs=None) -> dict:
    tensors = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for key, t in module.__dict__[kind].items():
                entry = None
                if t is not None:
                    grad = t.grad if kind == "_parameters" else None
                    entry = (
                        id(t),
                        bits(t),
                        t.requires_grad,
                        id(grad),
                        None if grad is None else bits(grad),
                    )
                tensors[f"{name}.{key}" if name else key] = entry
    result = {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "attributes": [
            (n, {k: v for k, v in vars(m).items() if not k.startswith("_")})
            for n, m in model.named_modules(remove_duplicate=False)
        ],
        "tensors": tensors,
        "outputs": _outputs(model, inputs),
    }
    if optimizer is not None:
        result["groups"] = [
            ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ]
        result["state"] = {
            id(p): {k: bits(v) if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
    return result


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], dict):
            assert before[key].keys() == after[key].keys(), key
            for name in before[key]:
                assert _same(before[key][name], after[key][name]), (key, name)
        else:
            assert _same(before[key], after[key]), key
