"""save_pretrained / from_pretrained: a converted model as a directory, PEFT style.

`save_pretrained(model, directory)` writes

- lowrank_config.json: {"library": "lowrank_ext", "library_version", "format_version",
  "modules": {qualified name: record}} with one record per outermost low-rank module (class,
  the dense class it replaced, sizes, layout: lowrank_ext/io/config.py);
- model.safetensors: the whole model's state dict (tensors only), tied or shared tensors saved
  once, as `safetensors.torch.save_model` does.

`from_pretrained(model, directory)` takes the base model built afresh (dense, as
`PeftModel.from_pretrained(base_model, directory)` takes it), puts an empty low-rank module of
the recorded structure in place of each recorded module (no SVD of the base weights) and loads
model.safetensors into the whole model, strict. Unlike a PEFT adapter, the file holds every
weight of the model, not only the low-rank ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..nn.convert import _carry_training_state, _disable_nested_tensor, _swap
from ..version import __version__
from .config import RecordError, build, describe, low_rank_modules

CONFIG_NAME = "lowrank_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1  # the layout of lowrank_config.json; a newer one is refused


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model` to `directory` (created if missing) as lowrank_config.json and
    model.safetensors; from_pretrained reads them back into a freshly built base model.

    Args:
        model: a model whose low-rank modules (LowRankLinear, LowRankConv2d,
            LowRankMultiheadAttention, e.g. from `lowrank_ext.convert`) are in any state:
            any rank, core "diag" or "full", grown or frozen.
        directory: where to write; created with its parents if missing. Files of these names
            already there are replaced (each written to a temporary file first, then renamed).

    Raises:
        TypeError: model is not an nn.Module.
        ValueError: model has no low-rank module, or is one itself (from_pretrained could not
            put it in place: wrap it, e.g. in nn.Sequential).
        NotADirectoryError: `directory` is an existing file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    modules = low_rank_modules(model)
    if "" in modules:
        raise ValueError(
            f"argument 'model' is itself a {type(model).__name__}, which from_pretrained cannot "
            "replace in place: wrap it (e.g. nn.Sequential(module)) or save its state_dict"
        )
    if not modules:
        raise ValueError(
            f"argument 'model' ({type(model).__name__}) has no low-rank module: convert it first "
            "(lowrank_ext.convert), or save a dense model with safetensors.torch.save_model"
        )
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{path}: exists and is not a directory; save_pretrained needs one"
        )
    config = {
        "library": "lowrank_ext",
        "library_version": __version__,
        "format_version": FORMAT_VERSION,
        "modules": {name: describe(module) for name, module in modules.items()},
    }
    save_model = _safetensors().torch.save_model
    path.mkdir(parents=True, exist_ok=True)
    _write(path / WEIGHTS_NAME, lambda file: save_model(model, file, {"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    _write(path / CONFIG_NAME, lambda file: Path(file).write_text(text, encoding="utf-8"))


def _write(target: Path, write) -> None:
    """`write(temporary name)` next to target, then rename: target is never half written."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def from_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Give the freshly built base `model` the low-rank structure and the weights saved in
    `directory` by save_pretrained; returns the model (changed in place).

    Each module recorded in lowrank_config.json must be in `model` under its name, of the dense
    class it replaced (e.g. torch.nn.Linear) and of the recorded sizes (in/out features, or the
    convolution's or attention's); it is replaced (under every name it is registered by) by a
    low-rank module of the recorded class, rank, core and frozen/active layout, on the dense
    module's device, in its dtype, with its training flag and, if all its parameters were
    frozen, frozen too. Then model.safetensors is loaded into the whole model, strict: every key
    of the model (tied tensors: one of their names) with the shape it has. Nothing is computed
    from the base model's weights: they are overwritten.

    Raises (each message names the file, and the module or key):
        FileNotFoundError: `directory`, lowrank_config.json or model.safetensors is missing.
        NotADirectoryError: `directory` is a file.
        IsADirectoryError: lowrank_config.json or model.safetensors is a directory.
        ValueError: a file is corrupt or truncated; lowrank_config.json is of a newer format
            version than this release reads, or malformed; a recorded module is missing from
            the model, of another class or of other sizes; model.safetensors lacks a key of the
            model, has a key the model does not, or a tensor of another shape.

    On every error the model is left as it was: everything is built and checked first, then
    swapped in and loaded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory (from_pretrained reads a directory)")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path}: is a file; from_pretrained reads a directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}"
        )
    config_file, weights_file = _file(path / CONFIG_NAME), _file(path / WEIGHTS_NAME)
    records = _read_config(config_file)
    shapes = _read_shapes(weights_file)
    replacements = {}
    for name, record in records.items():
        dense = _recorded_module(model, name, config_file)
        if id(dense) in replacements:
            raise ValueError(f"{config_file}: module {name!r} is recorded under two names")
        try:
            low_rank = build(name, record, dense)
        except RecordError as error:
            raise ValueError(f"{config_file}: {error}") from None
        _carry_training_state(dense, low_rank)
        replacements[id(dense)] = (dense, low_rank)
    _swap(model, {key: new for key, (_, new) in replacements.items()})
    try:
        state = _checked_state(model, shapes, weights_file)
        model.load_state_dict(state)
    except BaseException:
        _swap(model, {id(new): old for old, new in replacements.values()})
        raise
    _disable_nested_tensor(model)
    return model


def _file(file: Path) -> Path:
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing (save_pretrained writes it)")
    if file.is_dir():
        raise IsADirectoryError(f"{file}: is a directory, expected a file")
    return file


def _read_config(file: Path) -> dict:
    """{name: record} of a lowrank_config.json, its format checked."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not a valid JSON file ({error})") from None
    if not isinstance(config, dict) or config.get("library") != "lowrank_ext":
        raise ValueError(f'{file}: not a lowrank_ext config (no "library": "lowrank_ext")')
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{file}: 'format_version' must be an int >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{file}: format version {version} (written by lowrank_ext "
            f"{config.get('library_version')!r}) is newer than this release's "
            f"({__version__}: format {FORMAT_VERSION}); upgrade lowrank_ext to read it"
        )
    records = config.get("modules")
    if not isinstance(records, dict) or not records:
        raise ValueError(f"{file}: 'modules' must map module names to records, got {records!r}")
    names = sorted(records)
    for outer, inner in zip(names, names[1:]):
        if inner.startswith(outer + "."):
            raise ValueError(f"{file}: module {inner!r} is recorded inside module {outer!r}")
    return records


def _read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a safetensors file, from its header (which safetensors checks against the
    file's size: a truncated file is refused here)."""
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(file, framework="pt") as archive:
            return {key: tuple(archive.get_slice(key).get_shape()) for key in archive.keys()}
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error})") from None


def _safetensors():
    """The safetensors package, imported when needed: `import lowrank_ext` does not need it."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "save_pretrained and from_pretrained need safetensors: pip install "
            "'lowrank_ext[safetensors]' (or safetensors)"
        ) from None
    return safetensors


def _recorded_module(model: nn.Module, name: str, config_file: Path) -> nn.Module:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config_file}: module names must be non-empty strings, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"{config_file}: module {name!r} is not in the model ({type(model).__name__}); "
            "from_pretrained needs the base model the checkpoint was made from"
        ) from None


def _checked_state(model: nn.Module, shapes: dict, file: Path) -> dict[str, torch.Tensor]:
    """model.safetensors as a state dict for `model` (low-rank modules in place): every key
    checked before anything is loaded; a tied tensor's other names filled in."""
    current = model.state_dict(keep_vars=True)
    unexpected = [key for key in shapes if key not in current]
    if unexpected:
        raise ValueError(f"{file}: keys the model does not have: {_some(unexpected)}")
    for key, shape in shapes.items():
        if tuple(current[key].shape) != shape:
            raise ValueError(
                f"{file}: {key} has shape {shape}, the model's is {tuple(current[key].shape)} "
                f"(as {CONFIG_NAME} records it for low-rank modules)"
            )
    groups = _aliases(current)
    missing = [key for key in current if not any(name in shapes for name in groups.get(key, [key]))]
    if missing:
        raise ValueError(f"{file}: keys of the model it lacks: {_some(missing)}")
    safetensors = _safetensors()
    try:
        state = safetensors.torch.load_file(file)
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
    for key in current:
        if key not in state:
            state[key] = state[next(name for name in groups[key] if name in shapes)]
    return state


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{key: every key of the same memory}, for tensors held under several names (tied
    weights, a module registered twice): save_model writes one of them."""
    by_memory = defaultdict(list)
    for key, tensor in state.items():
        if tensor.device.type != "meta" and tensor.data_ptr() != 0:
            memory = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
            by_memory[memory].append(key)
    return {key: keys for keys in by_memory.values() if len(keys) > 1 for key in keys}


def _some(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
