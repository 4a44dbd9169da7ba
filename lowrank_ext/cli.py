"""`lowrank-ext` command line."""

from __future__ import annotations

import argparse
import json
import pickle
import pickletools
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path


class CheckpointError(Exception):
    """A file that `lowrank-ext analyze` cannot or will not read."""


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
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err


def _load_torch(path: Path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it can still read
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        callables = [refused.group(1)] if refused else _pickled_globals(path)
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
    """Names of the callables a plain pickle file imports, read without unpickling it."""
    names, strings = [], []
    try:
        with path.open("rb") as file:
            for opcode, arg, _ in pickletools.genops(file):
                if opcode.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not (all) a pickle: the names read so far are what there is
        pass
    return names


def load_checkpoint(path) -> object:
    """A state_dict or tensor from `path`: safetensors when the file is one (and safetensors is
    installed), else torch.load(weights_only=True, map_location="cpu"), which refuses pickled
    code instead of running it. Raises CheckpointError with a message for the user."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
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

            spectral_plots.save_report_figures(report, args.plot)
    except (CheckpointError, ValueError, TypeError, ImportError) as err:
        print(f"lowrank-ext analyze: {err}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(report.to_json())
    elif args.format == "csv":
        print(report.to_csv(), end="")
    else:
        print(report.to_markdown())
        print(f"\n{source}: {report.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and what the compiled library was built with")
    analyze = sub.add_parser(
        "analyze",
        help="singular values, ranks and rank collapse of every weight matrix in a checkpoint",
        description=(
            "Load a state_dict or tensor (torch.load with weights_only=True: pickled code is "
            "refused, never run; or a .safetensors file) and print the spectral report of "
            "lowrank_ext.spectral.analyze. Exit status 0, or 1 with a message."
        ),
    )
    analyze.add_argument("path", nargs="?", type=Path, help="checkpoint file (.pt, .safetensors)")
    analyze.add_argument("--demo", action="store_true", help="analyze a bundled tiny model")
    analyze.add_argument("--format", choices=("table", "json", "csv"), default="table")
    analyze.add_argument("--plot", type=Path, metavar="DIR", help="write figures to DIR")
    analyze.add_argument(
        "--rtol", type=float, default=1e-3, help="σ ≤ rtol·σ_max counts as zero (default 1e-3)"
    )
    analyze.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance instead of --rtol"
    )
    analyze.add_argument(
        "--collapse-fraction",
        type=float,
        default=0.1,
        help="flag a layer when more than this fraction of its σ count as zero (default 0.1)",
    )
    args = parser.parse_args(argv)
    if args.command == "analyze" and args.demo == (args.path is not None):
        analyze.error("give a checkpoint PATH or --demo (one of them)")
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


if __name__ == "__main__":
    sys.exit(main())
