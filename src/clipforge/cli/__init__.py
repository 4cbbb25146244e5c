"""`clipforge` command line: one module per subcommand group, each exposing `register(subparsers)`.

The front end parses arguments and calls the library; it holds no logic a test would want.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# Subcommand modules (clipforge.cli.<name>); each defines register(subparsers) and sets `func` on its parser.
COMMANDS = (
    "info",
    "train",
    "demo",
    "eval",
    "convert",
    "shards",
    "lit",
    "embed",
    "index",  # index and search
    "classify",
    "score",
    "export_onnx",
    "serve",
    "plan",
)


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
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (`train --config c.yaml --resume optim.lr=1e-3`)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..train.runlock import RunLockedError

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"clipforge {args.command}: warning: {message}", file=file or sys.stderr)

    try:
        with warnings.catch_warnings():  # restores the display after (main is also a library call)
            warnings.showwarning = one_line_warning  # what to do, not where in clipforge it was said
            return int(args.func(args) or 0)
    except (OSError, ValueError, KeyError, RunLockedError) as e:
        # bad input and full disks: one line naming the file and the problem, never a traceback
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        if isinstance(e, KeyError) and len(e.args) == 1:
            msg = str(e.args[0])  # str(KeyError) is the repr, in quotes
        print(f"clipforge {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
