"""Command line: `python -m dsv3_ref {info,train,generate,...} ...`.

Each subcommand lives beside the code it drives: a module in `COMMANDS` defines `add_cli(subparsers)`, which
registers its subparser and sets `func` (called with the parsed args; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# modules with an add_cli(subparsers); each adds one or more subcommands
COMMANDS = ["systems.accounting", "train.trainer", "inference.generate", "teaching.validate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv3_ref", description="dsv3_ref: DeepSeek-V3 reference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dsv3_ref.{name}").add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
