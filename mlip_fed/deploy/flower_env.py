"""The Flower console scripts of this environment and the offline environment every Flower process gets.

Shared by the SuperNode launcher, the local SuperLink, the FAB check and the loopback deployment; a leaf module so
``supernode`` and ``fab_guard`` can both use it without importing each other.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

#: A site talks to its SuperLink only: no telemetry, no update check, no model hub (docs/architecture.md, invariant 6).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def flower_executable(name: str) -> str:
    """The Flower console script of *this* environment first (the one that has mlip_fed installed)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found next to {sys.executable} or on PATH; install flwr>=1.42,<1.43")
    return found
