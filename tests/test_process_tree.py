"""mlip_fed/process_tree.py: a tree is found by PID and stopped whole; a member that ignores SIGTERM still ends
(SIGKILL after the grace)."""

from __future__ import annotations

import subprocess
import sys
import time

from mlip_fed.process_tree import alive, descendants, kill_tree, terminate_tree

#: A parent that starts a child which ignores SIGTERM, then both sleep; the parent prints the child's PID.
TREE = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)'],"
    " stdout=subprocess.PIPE, text=True)\n"
    "child.stdout.readline()\n"  # the child has installed its handler
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _start_tree(**popen: object) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, **popen)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    return parent, child


def _gone(pid: int) -> bool:
    """A SIGKILLed process is reaped a moment later (by init, once orphaned): wait up to 10 s for that."""
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_terminate_tree_ends_a_sigterm_deaf_child_after_the_grace() -> None:
    parent, child = _start_tree()
    try:
        assert descendants(parent.pid) == [child] and alive(child)
        pids = terminate_tree(parent.pid, grace_s=1.0)
        assert pids == [child, parent.pid]  # deepest first
        parent.wait(timeout=10)
        assert _gone(child)
    finally:
        kill_tree(parent.pid)
        parent.wait(timeout=10)


def test_kill_tree_takes_the_group_and_its_descendants_at_once() -> None:
    parent, child = _start_tree(start_new_session=True)
    try:
        assert kill_tree(parent.pid) == [child, parent.pid]
        assert parent.wait(timeout=10) == -9
        assert _gone(child)
    finally:
        kill_tree(parent.pid)


def test_a_process_that_is_gone_is_not_alive_and_has_no_descendants() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=30)
    assert not alive(done.pid) and descendants(done.pid) == []
    assert terminate_tree(done.pid, grace_s=0.1) == [done.pid]  # nothing to signal: returns at once
