"""The state-dict layout of a FactoredModule: tensors only, the layout read from their shapes.

A checkpoint holds, besides the bias (out,):

- a plain layer: U (out, r), V (in, r), S (r,) for core "diag" or (r, r) for core "full";
- a grown layer (after `grow`/`freeze`, core "diag"): U_frozen (out, f), V_frozen (in, f),
  S_frozen (f,) when the frozen scales are frozen too; U (out, a) and V (in, a) when a > 0
  components are active; S (a,) with frozen scales or (f + a,) without (absent when empty).

So the rank (from U and U_frozen), the core (S.dim()), the frozen part (U_frozen) and the frozen
scales (S_frozen's presence) need no record of their own, and every value is a tensor, as
safetensors, transformers' `save_pretrained` and sentence-transformers' `save` require. Loading
resizes the module to the checkpoint's layout, so a checkpoint at one rank loads into a module
built at another. Checkpoints of 0.1.0 also hold that layout as a dict under `_extra_state`: it is
checked against the tensors and consumed (no "unexpected key").

A load that fails leaves the module as it was: every check runs before anything changes, and if
the copy itself fails, the module gets its tensors back, objects and values. Keys missing from the
checkpoint or unexpected in it are not failures here: nn.Module.load_state_dict passes them on and
its `strict` decides at the end, after every module has loaded what it could (as for any module).

`effective_factors` turns these tensors into the (U, S, V) of W = U S Vᵀ: the one place that
says what W a layout holds, for the module's `factors()` and for readers of a state dict
(`lowrank_ext.analysis`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from .transaction import Snapshot

FACTORS = ("U", "S", "V")
FROZEN = ("U_frozen", "V_frozen", "S_frozen")
LEGACY_KEY = "_extra_state"  # 0.1.0's layout record, a dict
_LEGACY_FIELDS = ({"rank", "core"}, {"rank", "core", "frozen", "frozen_scales"})


def effective_factors(
    U: torch.Tensor | None,
    S: torch.Tensor | None,
    V: torch.Tensor | None,
    U_frozen: torch.Tensor | None = None,
    V_frozen: torch.Tensor | None = None,
    S_frozen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (U (out, r), S (r,) or (r, r), V (in, r)) of W = U S Vᵀ that a layout's tensors hold,
    frozen components first: what forward computes with.

    Without U_frozen these are U, S, V as given. Otherwise U = [U_frozen, Ũ], V = [V_frozen, Ṽ]
    with Ũ, Ṽ the active columns projected out of the frozen span and normalized
    (`lowrank_ext.ops.project_out`; none when U is None), and S = [S_frozen, S] (either may be
    None). The active columns are not orthogonalized against each other. float32/float64 (the
    op's dtypes); shapes are assumed to form a layout (`read_layout` checks a checkpoint's).
    """
    if U_frozen is None:
        return U, S, V
    if U is not None:
        U_frozen = torch.cat([U_frozen, ops.project_out(U_frozen, U, normalize=True)], dim=1)
        V_frozen = torch.cat([V_frozen, ops.project_out(V_frozen, V, normalize=True)], dim=1)
    scales = [t for t in (S_frozen, S) if t is not None]
    return U_frozen, scales[0] if len(scales) == 1 else torch.cat(scales), V_frozen


class _Refused(Exception):
    """A checkpoint that cannot fit the module; the message names the key and the module."""


def layout_shapes(module, rank: int, frozen: int = 0, frozen_scales: bool = False) -> dict:
    """{name: shape, or None for a tensor the layout does not hold} of U, S, V and the frozen
    buffers of `module` at rank `rank` with `frozen` frozen components."""
    out, inp = module.out_features, module.in_features
    if not frozen:
        return {
            "U": (out, rank),
            "S": module._core_shape(rank),
            "V": (inp, rank),
            **dict.fromkeys(FROZEN),
        }
    active = rank - frozen
    scales = active if frozen_scales else rank
    return {
        "U": (out, active) if active else None,
        "S": (scales,) if scales else None,
        "V": (inp, active) if active else None,
        "U_frozen": (out, frozen),
        "V_frozen": (inp, frozen),
        "S_frozen": (frozen,) if frozen_scales else None,
    }


def take_layout(module, shapes: dict) -> None:
    """Give U, S, V and the frozen buffers the shapes `shapes` (new tensors, values unset)."""
    like = module.U if module.U is not None else module.U_frozen
    for name, shape in shapes.items():
        current = getattr(module, name)
        if shape is None:
            setattr(module, name, None)
        elif current is None or tuple(current.shape) != shape:
            empty = like.new_empty(shape)
            if name in FACTORS:
                trainable = True if current is None else current.requires_grad
                empty = nn.Parameter(empty, trainable)
            setattr(module, name, empty)


def _where(module, prefix: str) -> str:
    name = prefix[:-1]
    place = f"module {name!r}" if name else "the root module"
    return f"{place}, a {type(module).__name__}({module._repr_shape()})"


def read_layout(module, state_dict, prefix: str) -> dict | None:
    """The shapes (as `layout_shapes`) of the checkpoint's layout under `prefix`, checked to fit
    `module`; None when plain factors are missing (the default loader reports missing keys).
    Raises _Refused."""
    where = _where(module, prefix)

    def refuse(name: str, text: str) -> _Refused:
        return _Refused(f"{prefix}{name}: {text} ({where})")

    saved = {name: state_dict.get(prefix + name) for name in FACTORS + FROZEN}
    for name, value in saved.items():
        if value is not None and not torch.is_tensor(value):
            raise refuse(name, f"the checkpoint holds a {type(value).__name__}, not a tensor")
    legacy = _legacy_record(state_dict, prefix, refuse)
    for name in ("U", "V", "U_frozen", "V_frozen"):
        if saved[name] is not None and saved[name].dim() != 2:
            raise refuse(name, f"expected a 2-D tensor, got shape {tuple(saved[name].shape)}")
    U, S, V = (saved[name] for name in FACTORS)
    if saved["U_frozen"] is None:
        for name in ("V_frozen", "S_frozen"):
            if saved[name] is not None:
                raise refuse(name, f"present without {prefix}U_frozen, which a grown layer holds")
        if U is None or S is None or V is None:
            return None
        if S.dim() not in (1, 2):
            raise refuse(
                "S", f"expected 1-D (core 'diag') or 2-D (core 'full'), got shape {tuple(S.shape)}"
            )
        rank, frozen, frozen_scales = U.shape[1], 0, False
        core = "diag" if S.dim() == 1 else "full"
    else:
        if saved["V_frozen"] is None:
            raise refuse("V_frozen", f"missing; a grown layer holds it with {prefix}U_frozen")
        if (U is None) != (V is None):
            present, absent = ("U", "V") if V is None else ("V", "U")
            raise refuse(absent, f"missing while {prefix}{present} is present")
        if S is not None and S.dim() != 1:
            raise refuse("S", f"a grown layer's S is 1-D (core 'diag'), got shape {tuple(S.shape)}")
        frozen = saved["U_frozen"].shape[1]
        if not frozen:
            raise refuse("U_frozen", "holds no component (shape with 0 columns)")
        rank = frozen + (0 if U is None else U.shape[1])
        frozen_scales, core = saved["S_frozen"] is not None, "diag"
    if legacy is not None:
        derived = {"rank": rank, "core": core}
        if frozen:
            derived.update(frozen=frozen, frozen_scales=frozen_scales)
        if legacy != derived:
            raise refuse(
                LEGACY_KEY, f"0.1.0's record {legacy!r} disagrees with the tensors ({derived!r})"
            )
    if core != module.core:
        shape = "absent" if S is None else f"of shape {tuple(S.shape)}"
        grown = ", a grown layer's" if frozen else ""
        raise refuse(
            "S",
            f"checkpoint has core={core!r} but the module has core={module.core!r} "
            f"(S {shape}{grown})",
        )
    limit = min(module.in_features, module.out_features)
    if not 1 <= rank <= limit:
        first = "U_frozen" if frozen else "U"
        shapes = ", ".join(
            f"{name} of shape {tuple(saved[name].shape)}"
            for name in ("U_frozen", "U")
            if saved[name] is not None
        )
        raise refuse(first, f"rank {rank} ({shapes}) is outside [1, {limit}]")
    expected = layout_shapes(module, rank, frozen, frozen_scales)
    for name, shape in expected.items():
        tensor = saved[name]
        if shape is None:
            if tensor is not None:
                raise refuse(name, f"not part of a layer with this layout ({_describe(expected)})")
        elif tensor is None:
            raise refuse(
                name, f"missing from the checkpoint of a grown layer ({_describe(expected)})"
            )
        elif tuple(tensor.shape) != shape:
            current = getattr(module, name)
            current = "absent" if current is None else tuple(current.shape)
            raise _Refused(
                f"size mismatch for {prefix}{name}: copying a param with shape "
                f"{tuple(tensor.shape)} from checkpoint, the shape in current model is {current}; "
                f"{where} accepts {name} of shape {shape} at this rank"
            )
    return expected


def _describe(shapes: dict) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in shapes.items() if shape is not None)


def _legacy_record(state_dict, prefix: str, refuse) -> dict | None:
    """0.1.0's `_extra_state` dict under `prefix`, checked to be one 0.1.0 wrote, or None."""
    record = state_dict.get(prefix + LEGACY_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or set(record) not in _LEGACY_FIELDS:
        raise refuse(
            LEGACY_KEY,
            "expected 0.1.0's layout record, a dict with 'rank' and 'core' (and 'frozen', "
            f"'frozen_scales' for a grown layer), got {record!r}",
        )
    return record


def load_factored(
    module,
    load: Callable[[], None],
    state_dict,
    prefix: str,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """FactoredModule._load_from_state_dict: check, resize, then `load` (nn.Module's copy).

    If the copy raises or reports an error, the module's parameters and buffers are put back,
    objects and values. Missing and unexpected keys are load_state_dict's to judge (module doc);
    0.1.0's record, checked here, is taken off the unexpected ones."""
    try:
        shapes = read_layout(module, state_dict, prefix)
    except _Refused as refusal:
        error_msgs.append(str(refusal))
        return
    # The layout changes and the copy write in place: keep values too (nn/transaction.py).
    snapshot = Snapshot(module, values=[module])
    errors, unexpected = len(error_msgs), len(unexpected_keys)
    try:
        if shapes is not None:
            take_layout(module, shapes)
        load()
    except BaseException:
        snapshot.restore()
        raise
    legacy = prefix + LEGACY_KEY
    if legacy in unexpected_keys[unexpected:]:
        unexpected_keys.remove(legacy)  # read and checked above
    if len(error_msgs) > errors:
        snapshot.restore()
