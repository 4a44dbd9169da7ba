"""`lowrank-ext` command line."""

from __future__ import annotations

import _compat_pickle
import argparse
import json
import pickle
import pickletools
import re
import sys
import textwrap
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

from .version import __version__

# What `analyze` reads in a folder (a Hugging Face model folder), in this order of preference
# (transformers' own): one file, or an index json whose "weight_map" names the shards.
_FOLDER_CHECKPOINTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TABLE_WIDTH = 120  # the default table's lines are at most this long


class CheckpointError(Exception):
    """A file that `lowrank-ext analyze` cannot or will not read."""


def _natural_key(name: str) -> tuple:
    # "layers.2.fc" < "layers.10.fc": digit runs compare as numbers (split with a capture group
    # puts text at even and digits at odd positions, so the tuples compare like with like).
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name)))


def _natural_order(tensors: dict) -> dict:
    """The same dict in natural order of its keys: safetensors files keep no model order (the
    format writes its header sorted by dtype, then name), so this is the closest to it."""
    return {key: tensors[key] for key in sorted(tensors, key=_natural_key)}


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file opens with an 8-byte little-endian header length, then a JSON header.
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"{path} is a safetensors file; reading it needs `pip install lowrank_ext[safetensors]`"
        ) from err
    try:
        return _natural_order(load_file(str(path), device="cpu"))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err


def _load_torch(path: Path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it can still read
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch names one refused global in its message ("Unsupported global: GLOBAL x" or
        # "unsupported GLOBAL x whose module ... is blocked"), or none (e.g. "Unsupported operand"
        # for a protocol it does not read); the pickles themselves name them all.
        refused = re.findall(r"GLOBAL (\S+)", str(err))
        callables = list(dict.fromkeys([*refused, *_pickled_globals(path)]))
        if callables:
            raise CheckpointError(
                f"refused to load {path}: it holds pickled Python code or objects "
                f"({', '.join(callables)}), which weights-only loading never executes; analyze a "
                "plain state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
            ) from None
        detail = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(err), re.S)
        raise CheckpointError(
            f"cannot read {path}: not a checkpoint that weights-only loading accepts "
            f"({detail.group(1).strip() if detail else 'unpickling failed'}); nothing in it "
            "was executed"
        ) from None
    except Exception as err:  # torch.load raises many types for corrupt or foreign files
        message = str(err).split("\n")[0]
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint or a corrupt one "
            f"({type(err).__name__}: {message})"
        ) from None


def _pickled_globals(path: Path) -> list[str]:
    """The callables and classes the pickles in `path` import that weights-only loading does
    not allow, read without unpickling: a plain pickle, the *.pkl records of a torch.save zip,
    or the successive pickles of the legacy (pre-1.6) torch.save format."""
    names = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        with archive.open(member) as stream:
                            names += _globals_in(stream)
        else:
            with path.open("rb") as stream:
                names += _globals_in(stream)
    except (OSError, zipfile.BadZipFile):
        pass  # unreadable: the names read so far are what there is
    allowed = _allowed_globals()
    # Dotted identifiers only: bytes after the last pickle (a legacy file's storages) may
    # decode as opcodes for a moment before genops gives up.
    return [
        name
        for name in dict.fromkeys(names)
        if name not in allowed and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name)
    ]


def _globals_in(stream) -> list[str]:
    """Names imported by GLOBAL, INST and STACK_GLOBAL in the pickles of `stream`, one after
    another until the stream ends or stops being a pickle."""
    names = []
    while True:
        pushed, memo = [], {}  # what each opcode pushed (a str or None); the memo's strings
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                op = opcode.name
                if op in ("GLOBAL", "INST"):  # protocols 0-2: Python 2 names, as unpickled
                    module, name = arg.split(" ", 1)
                    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
                    names.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
                elif op == "STACK_GLOBAL":
                    module, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
                    if isinstance(module, str) and isinstance(name, str):
                        names.append(f"{module}.{name}")
                    pushed.append(None)
                elif op == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op not in ("PROTO", "FRAME", "STOP"):
                    pushed.append(arg if isinstance(arg, str) else None)
        except Exception:  # the end of the stream (genops raises there), or no pickle
            return names


def _allowed_globals() -> set[str]:
    # What torch.load(weights_only=True) accepts: naming those would only hide the culprit.
    # torch keeps the list private; without it every imported name is reported.
    try:
        import torch
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        for item in torch.serialization.get_safe_globals():
            obj = item[0] if isinstance(item, tuple) else item
            allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
        return allowed
    except Exception:
        return set()


def _load_folder(folder: Path) -> dict:
    """The state_dict of a Hugging Face model folder: its model.safetensors or
    pytorch_model.bin, or every shard its index json names, merged."""
    for name in _FOLDER_CHECKPOINTS:
        path = folder / name
        if path.is_file():
            return _load_sharded(path) if name.endswith(".index.json") else load_checkpoint(path)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder} is a folder without a checkpoint lowrank-ext reads: expected one of "
        f"{', '.join(_FOLDER_CHECKPOINTS)} (a Hugging Face model folder), found "
        f"{', '.join(found[:10]) + (', ...' if len(found) > 10 else '') if found else 'nothing'}; "
        "give the checkpoint file itself otherwise"
    )


def _load_sharded(index: Path) -> dict:
    """Every shard named in the "weight_map" of `index`, in natural order of the shard names
    (pytorch_model-00001-of-00003.bin, ...), merged; safetensors shards in natural key order."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"cannot read {index} as a checkpoint index (json): {err}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index} has no "weight_map" naming the shards of the checkpoint')
    state_dict = {}
    for shard in sorted(set(map(str, weight_map.values())), key=_natural_key):
        path = index.parent / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index} names a shard outside its folder: {shard!r}")
        if not path.is_file():
            raise CheckpointError(
                f"{index} names the shard {shard}, which is missing from {index.parent}"
            )
        part = load_checkpoint(path)
        if not isinstance(part, dict):
            raise CheckpointError(f"shard {path} holds a {type(part).__name__}, not a state_dict")
        state_dict.update(part)
    missing = [key for key in weight_map if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"{index} lists {len(missing)} tensor(s) that no shard holds, e.g. {missing[0]!r} "
            f"(in {weight_map[missing[0]]})"
        )
    return (
        _natural_order(state_dict) if index.name.endswith(".safetensors.index.json") else state_dict
    )


def load_checkpoint(path) -> object:
    """A state_dict or tensor from `path`: safetensors when the file is one (and safetensors is
    installed; keys in natural order, as the format keeps no model order), else
    torch.load(weights_only=True, map_location="cpu"), which refuses pickled code instead of
    running it (naming what it would import). A folder is read as a Hugging Face model folder:
    model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin or
    pytorch_model.bin.index.json, the first found. Raises CheckpointError with a message for
    the user."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _load_safetensors(path)
    return _load_torch(path)


def demo_model():
    """A seeded tiny model for `analyze --demo`: fc2 has planted rank 8 of 64 (collapsed),
    fc3 is a LowRankLinear of rank 4, the others are nn's default random initialization."""
    import torch
    from torch import nn

    from lowrank_ext import LowRankLinear

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(1, 8, 3),
                flatten=nn.Flatten(),
                fc1=nn.Linear(8 * 6 * 6, 64),
                relu1=nn.ReLU(),
                fc2=nn.Linear(64, 64),
                relu2=nn.ReLU(),
                fc3=LowRankLinear(64, 32, rank=4),
                head=nn.Linear(32, 10),
            )
        )
        left, _ = torch.linalg.qr(torch.randn(64, 8))
        right, _ = torch.linalg.qr(torch.randn(64, 8))
        with torch.no_grad():
            model.fc2.weight.copy_(left @ torch.diag(torch.linspace(2.0, 0.5, 8)) @ right.T)
    return model


def _analyze(args) -> int:
    import torch

    from lowrank_ext.analysis import spectral

    try:
        if args.demo:
            target, source = demo_model(), "demo model"
        else:
            target, source = load_checkpoint(args.path), str(args.path)
            if not isinstance(target, dict) and not torch.is_tensor(target):
                raise CheckpointError(
                    f"{source} holds a {type(target).__name__}, not a state_dict or a tensor"
                )
        report = spectral.analyze(
            target,
            rtol=args.rtol,
            atol=args.atol,
            collapse_fraction=args.collapse_fraction,
            name=Path(source).stem,
        )
        if args.plot is not None:
            from lowrank_ext.plots import spectral as spectral_plots

            try:
                args.plot.mkdir(parents=True, exist_ok=True)
                spectral_plots.save_report_figures(report, args.plot)
            except OSError as err:
                raise CheckpointError(f"cannot write the figures to {args.plot}: {err}") from None
    except (CheckpointError, ValueError, TypeError, ImportError) as err:
        print(f"lowrank-ext analyze: {err}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(report.to_json())
    elif args.format == "csv":
        print(report.to_csv(), end="")
    else:
        print(report.to_markdown(args.columns, max_width=None if args.wide else TABLE_WIDTH))
        summary = f"{source}: {report.summary()}"
        if not args.wide:
            summary = textwrap.fill(
                summary, TABLE_WIDTH, break_long_words=False, break_on_hyphens=False
            )
        print(f"\n{summary}")
    return 0


def _columns_help() -> str:
    """The table's columns and what each means, for `analyze --help`."""
    from lowrank_ext.analysis.report import COMPACT_COLUMNS, TABLE_COLUMNS

    headers = {column.key: column.header for column in TABLE_COLUMNS}
    lines = textwrap.wrap(
        "table columns (default, within 120 characters: "
        f"{', '.join(headers[key] for key in COMPACT_COLUMNS)}; --wide: all of them; "
        "--columns KEY,...: those), as KEY (header): meaning:",
        width=96,
    )
    for column in TABLE_COLUMNS:
        lines += textwrap.wrap(
            f"{column.key} ({column.header}): {column.meaning}",
            width=96,
            initial_indent="  ",
            subsequent_indent="      ",
        )
    lines += [
        "",
        "Singular values σ₁ ≥ … are of the N×M matrix (float64 SVD; a factored layer from its",
        "factors, without building W). JSON and CSV (--format) hold every field under its KEY.",
    ]
    return "\n".join(lines)


def _column_list(text: str) -> list[str]:
    from lowrank_ext.analysis.report import TABLE_COLUMNS

    keys = [key.strip() for key in text.split(",") if key.strip()]
    known = [column.key for column in TABLE_COLUMNS]
    unknown = [key for key in keys if key not in known]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
            if unknown
            else "name at least one column"
        )
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-ext", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and what the compiled library was built with")
    analyze = sub.add_parser(
        "analyze",
        help="singular values, ranks and rank collapse of every weight matrix in a checkpoint",
        description=textwrap.fill(
            "Load a state_dict or tensor (torch.load with weights_only=True: pickled code is "
            "refused, never run; or a .safetensors file; or a Hugging Face model folder with "
            "model.safetensors, pytorch_model.bin or their sharded *.index.json) and print the "
            "spectral report of lowrank_ext.spectral.analyze, one row per weight matrix in the "
            "checkpoint's order (safetensors keep none: their names in natural order, layers.2 "
            "before layers.10). Exit status 0, or 1 with a message.",
            width=96,
        ),
        epilog=_columns_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument(
        "path", nargs="?", type=Path, help="checkpoint file (.pt, .bin, .safetensors) or folder"
    )
    analyze.add_argument("--demo", action="store_true", help="analyze a bundled tiny model")
    analyze.add_argument("--format", choices=("table", "json", "csv"), default="table")
    analyze.add_argument(
        "--wide",
        action="store_true",
        help="table: every column and full layer names, however wide (default: 7 columns, "
        "lines within 120 characters, long layer names shortened in the middle with …)",
    )
    analyze.add_argument(
        "--columns",
        type=_column_list,
        metavar="KEY,...",
        help="table: these columns, in this order (keys below)",
    )
    analyze.add_argument(
        "--plot", type=Path, metavar="DIR", help="write figures to DIR (created if missing)"
    )
    analyze.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="σ ≤ rtol·σ_max counts as zero (default 1e-3 when --atol is not given)",
    )
    analyze.add_argument(
        "--atol",
        type=float,
        default=None,
        help="σ ≤ atol counts as zero; with --rtol too, the larger tolerance applies: "
        "max(rtol·σ_max, atol) (scipy.linalg.pinv's rule)",
    )
    analyze.add_argument(
        "--collapse-fraction",
        type=float,
        default=0.1,
        help="flag a layer when more than this fraction of its σ count as zero (default 0.1)",
    )
    args = parser.parse_args(argv)
    if args.command == "analyze":
        if args.demo == (args.path is not None):
            analyze.error("give a checkpoint PATH or --demo (one of them)")
        if args.format != "table" and (args.wide or args.columns is not None):
            analyze.error(
                "--wide and --columns shape the table; --format json/csv hold every field"
            )
        if args.columns is None:
            args.columns = None if args.wide else _compact_columns()
        if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
            analyze.error(f"--plot {args.plot}: not a folder (figures go into a folder)")
    try:
        import lowrank_ext
    except ImportError as err:
        print(f"lowrank-ext: {err}", file=sys.stderr)
        return 1
    if args.command == "info":
        print(json.dumps(lowrank_ext.build_info(), indent=2))
    elif args.command == "analyze":
        return _analyze(args)
    return 0


def _compact_columns() -> list[str]:
    from lowrank_ext.analysis.report import COMPACT_COLUMNS

    return list(COMPACT_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
