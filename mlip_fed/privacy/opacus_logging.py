"""Undo the root log handler that importing Opacus installs.

``opacus/utils/module_utils.py`` calls ``logging.basicConfig(format="%(asctime)s:%(levelname)s:%(message)s", ...)``
at import time. In a Flower simulation process that gives the root logger a stderr handler at level NOTSET, and every
record of Flower's own ``flwr`` logger (level DEBUG, propagating) is then printed a second time, DEBUG included:
``12/07/2026 17:14:09:DEBUG:Initialising: RayBackend`` on every run's console. Every module here that imports
Opacus calls ``drop_opacus_root_handler()`` right after.
"""

from __future__ import annotations

import logging

OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
OPACUS_DATEFMT = "%m/%d/%Y %H:%M:%S"


def drop_opacus_root_handler() -> list[logging.Handler]:
    """Remove the root handler(s) with Opacus's basicConfig format; returns what was removed."""
    root = logging.getLogger()
    removed = []
    for handler in list(root.handlers):
        fmt = handler.formatter
        if fmt is not None and fmt._fmt == OPACUS_FORMAT and fmt.datefmt == OPACUS_DATEFMT:
            root.removeHandler(handler)
            removed.append(handler)
    return removed
