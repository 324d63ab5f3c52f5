"""Stop a simulation's SuperLink tree when the process that launched it dies.

``flwr run`` starts the local SuperLink detached (its own session) and ``flower-superlink`` 1.42 has no
``--parent-pid`` option (SuperExec and the simulation process have one, but they watch the SuperLink, not us). A
launcher killed outright (SIGKILL, OOM killer, a closed terminal) would leave the federation running to its last
round, still listening on its ports. ``run_flwr_simulation`` therefore starts this watchdog, in its own session so a
signal to the launcher's process group does not reach it:

    python -m mlip_fed.federation.watchdog LAUNCHER_PID FLWR_HOME [--pid PID ...] [--remove-home]

It polls the launcher every ``POLL_S``; once the launcher is gone it SIGTERMs the extra ``--pid`` processes
(``flwr run``), stops the SuperLink started under ``FLWR_HOME`` and everything below it by PID (``stop_superlink``),
optionally removes ``FLWR_HOME``, and exits. A launcher that finishes normally stops the tree itself and then ends
the watchdog by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlip_fed.federation.superlink_tree import stop_superlink

POLL_S = 0.5
#: Grace between SIGTERM and SIGKILL when the launcher is gone: nobody is waiting for a clean shutdown.
GRACE_S = 5.0


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None when it is gone.

    A PID alone can be reused by the time we look again; PID plus start time names one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # exited, not yet reaped: gone for our purposes
        return None
    return int(fields[19])


def start_watchdog(flwr_home: Path, extra_pids: list[int], remove_home: bool = False) -> subprocess.Popen:
    """Start the watchdog for this process (the launcher), in its own session; its output is discarded."""
    cmd = [sys.executable, "-m", "mlip_fed.federation.watchdog", str(os.getpid()), str(flwr_home)]
    for pid in extra_pids:
        cmd += ["--pid", str(pid)]
    if remove_home:
        cmd.append("--remove-home")
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop_watchdog(proc: subprocess.Popen) -> None:
    """End the watchdog by PID (the launcher has already stopped the tree)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def watch(launcher_pid: int, flwr_home: Path, extra_pids: list[int], remove_home: bool) -> int:
    launcher = start_time(launcher_pid)
    extras = {pid: start_time(pid) for pid in extra_pids}
    while launcher is not None and start_time(launcher_pid) == launcher:
        time.sleep(POLL_S)
    for pid, started in extras.items():  # flwr run: its own PID, checked against reuse
        if started is not None and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    stop_superlink(flwr_home, timeout_s=GRACE_S)
    if remove_home:
        shutil.rmtree(flwr_home, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlip_fed.federation.watchdog", description=__doc__)
    parser.add_argument("launcher_pid", type=int)
    parser.add_argument("flwr_home", type=Path)
    parser.add_argument("--pid", type=int, action="append", default=[], help="also SIGTERM this process")
    parser.add_argument("--remove-home", action="store_true", help="remove FLWR_HOME afterwards")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the launcher's death (or SIGTERM from it) ends the watch
    return watch(args.launcher_pid, args.flwr_home.resolve(), args.pid, args.remove_home)


if __name__ == "__main__":
    sys.exit(main())
