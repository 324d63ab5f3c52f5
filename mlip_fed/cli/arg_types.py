"""argparse types that refuse a bad command-line value at parse time, naming the option and the value.

A bad ``--rounds`` or ``--cpus-per-site`` must stop the command before it generates data or starts a federation,
with argparse's usual ``error: argument --rounds: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def at_least(minimum: float, kind: type[int] | type[float] = int) -> Callable[[str], int | float]:
    """A type converting to ``kind`` and refusing values below ``minimum``."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path
