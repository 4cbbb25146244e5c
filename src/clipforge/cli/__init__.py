"""`clipforge` command line: one module per subcommand group, each exposing `register(subparsers)`.

The front end parses arguments and calls the library; it holds no logic a test would want.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules (clipforge.cli.<name>); each defines register(subparsers) and sets `func` on its parser.
COMMANDS = ("info", "train", "demo", "eval", "convert", "shards", "lit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge", description="Train, evaluate and use CLIP-style models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
