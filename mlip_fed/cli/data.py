"""``mlip-data``: synthesise, label and check site data.

Each subcommand lives in its own module (``data_synth``, ``data_label``, ``data_check``) exposing
``register(subparsers)``; this file only dispatches, so the entry point stays cheap to import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mlip_fed.cli.help_format import HelpFormatter, describe

SUBCOMMANDS: tuple[str, ...] = ("synth", "label", "check")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlip-data", description=describe(__doc__), formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"mlip_fed.cli.data_{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"mlip-data {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
