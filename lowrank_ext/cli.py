"""`lowrank-ext` command line."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the version and what the compiled library was built with")
    args = parser.parse_args(argv)
    try:
        import lowrank_ext
    except ImportError as err:
        print(f"lowrank-ext: {err}", file=sys.stderr)
        return 1
    if args.command == "info":
        print(json.dumps(lowrank_ext.build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
