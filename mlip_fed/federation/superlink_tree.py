"""Our local SuperLink's process tree, found by the ``FLWR_HOME`` it was started with, and stopped by PID.

``flwr run`` starts its SuperLink detached; it outlives the run. The launcher (``simulation``) and, when the launcher
is killed outright, the watchdog process (``watchdog``) both stop it here, so neither imports the other for it.
"""

from __future__ import annotations

from pathlib import Path

from mlip_fed.process_tree import terminate, tree


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes started with this exact FLWR_HOME (ours, and only ours)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"flower-superlink" not in cmdline:
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


def stop_superlink(flwr_home: Path, timeout_s: float = 20.0) -> list[int]:
    """Stop our SuperLink and everything it started (SuperExec, the simulation process, Ray), by PID.

    The simulation process runs the ServerApp with an in-process grid: it does not die with the
    SuperLink, so the whole tree is signalled (SIGTERM, then SIGKILL after ``timeout_s``).
    """
    return terminate(tree(superlink_pids(Path(flwr_home))), timeout_s)
