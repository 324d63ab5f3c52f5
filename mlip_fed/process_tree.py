"""Process trees by PID: list a process's descendants, and stop a tree (SIGTERM, wait, SIGKILL).

One implementation for everything that starts process trees: the simulation wrapper (SuperLink, SuperExec,
the simulation process, Ray), the local deployment (launchers, SuperNodes, ClientApps), ``bench/run_all.py``
(a bench that overruns) and the tests. Everything is by PID read from ``/proc``, never by name, so a tree
started by someone else on the same machine is never touched. The descendants are collected *before* any
signal is sent: a child whose parent dies is reparented to init and could no longer be found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

#: How often ``terminate`` looks whether the tree is down.
_POLL_S = 0.1


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first discovered breadth-first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def tree(roots: Iterable[int]) -> list[int]:
    """Each root's descendants, deepest first, then the root: the order in which a tree is signalled."""
    return [p for root in roots for p in [*reversed(descendants(root)), root]]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def send(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each PID; one that has already gone is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def terminate(pids: list[int], grace_s: float) -> list[int]:
    """SIGTERM every PID, wait up to ``grace_s`` for all to end, SIGKILL the rest; returns ``pids``.

    ``pids`` should come from :func:`tree`, collected while the tree was still whole.
    """
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(_POLL_S)
    send([pid for pid in pids if alive(pid)], signal.SIGKILL)
    return pids


def terminate_tree(root: int, grace_s: float) -> list[int]:
    """:func:`terminate` on ``root`` and all its descendants; returns the PIDs signalled."""
    return terminate(tree([root]), grace_s)


def kill_tree(root: int) -> list[int]:
    """SIGKILL ``root``, its process group (if it leads one) and every descendant, at once: a crash, not a shutdown.

    The process group alone is not enough: a process that starts children in sessions of their own (``mlip-client``
    starts each SuperNode so) would leave them running, reparented to init.
    """
    pids = tree([root])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(root) == root:
            os.killpg(root, signal.SIGKILL)
    send(pids, signal.SIGKILL)
    return pids
