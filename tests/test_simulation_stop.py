"""Stopping a simulation without a Flower run: the launcher watchdog and the resume hint (seconds, no Ray).

The end-to-end Ctrl-C test is ``tests/test_flwr_run.py::test_ctrl_c_after_round_one_then_resume``."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlip_fed.federation import simulation
from mlip_fed.federation.simulation import SimulationResult, resume_hint
from mlip_fed.federation.superlink_tree import superlink_pids
from mlip_fed.federation.watchdog import start_time, stop_watchdog
from mlip_fed.process_tree import alive, descendants

# Stands in for `flower-superlink` (stop_superlink finds it by that word in its command line and its FLWR_HOME) with
# one child, as the SuperExec below a real one.
FAKE_SUPERLINK = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"


def _wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_watchdog_stops_the_tree_when_the_launcher_dies(tmp_path: Path) -> None:
    home = (tmp_path / "flwr_home").resolve()
    home.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    link = subprocess.Popen(
        [sys.executable, "-c", FAKE_SUPERLINK, "flower-superlink"],
        env={**os.environ, "FLWR_HOME": str(home)},
        start_new_session=True,  # detached, as flwr run starts the real one
    )
    extra = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands in for `flwr run`
    watchdog = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (superlink_pids(home) and descendants(link.pid)):
            time.sleep(0.1)
        tree = [link.pid, *descendants(link.pid)]
        assert len(tree) == 2
        cmd = [sys.executable, "-m", "mlip_fed.federation.watchdog", str(launcher.pid), str(home)]
        watchdog = subprocess.Popen([*cmd, "--pid", str(extra.pid), "--remove-home"], start_new_session=True)
        time.sleep(1.0)  # it watches; nothing is touched while the launcher lives
        assert watchdog.poll() is None and all(alive(p) for p in tree) and home.is_dir()
        launcher.kill()  # the launcher dies outright: no teardown of its own
        launcher.wait()
        assert watchdog.wait(timeout=60) == 0
        link.wait(timeout=10)
        extra.wait(timeout=10)
        assert _wait_gone(tree) == []
        assert not home.exists()
    finally:
        for proc in (launcher, link, extra, watchdog):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stop_watchdog_ends_it_without_touching_the_tree(tmp_path: Path) -> None:
    home = tmp_path / "flwr_home"
    home.mkdir()
    cmd = [sys.executable, "-m", "mlip_fed.federation.watchdog", str(os.getpid()), str(home), "--remove-home"]
    watchdog = subprocess.Popen(cmd, start_new_session=True)
    time.sleep(0.5)
    stop_watchdog(watchdog)
    assert watchdog.poll() is not None and home.is_dir()  # the launcher lives: no teardown happened


def test_start_time_names_one_process() -> None:
    assert start_time(os.getpid()) == start_time(os.getpid()) is not None
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert start_time(proc.pid) is None


def test_resume_hint_repeats_the_command_with_resume(tmp_path: Path) -> None:
    result = SimulationResult(-2, {"completed_rounds": 3}, tmp_path, tmp_path / "flwr_run.log", 1.0, interrupted=True)
    argv = ["--sites", "2", "--out", str(tmp_path / "my run"), "federation.resume=false", "train.lr=0.1"]
    hint = resume_hint("mlip-simulate", argv, result)
    assert "interrupted after round 3" in hint and str(tmp_path / "checkpoints") in hint
    assert shlex.split(hint.splitlines()[-1]) == [
        "mlip-simulate", "--sites", "2", "--out", str(tmp_path / "my run"), "train.lr=0.1", "federation.resume=true"
    ]  # fmt: skip
    assert not result.ok and "interrupted after round 3" in result.failure_reason()
    none_done = SimulationResult(-2, None, tmp_path, tmp_path / "log", 1.0, interrupted=True)
    assert "no round had completed" in resume_hint("mlip-demo", [], none_done, ["python", "-m", "mlip_fed.cli.demo"])


def test_an_interrupt_tears_down_and_raises_with_the_result(tmp_path: Path, monkeypatch) -> None:
    """KeyboardInterrupt while flwr run streams: flwr run is killed, stop_superlink runs with the short grace, the
    watchdog is ended, SimulationInterrupted carries the result; the SIGINT/SIGTERM handlers are as before."""
    events: list[str] = []

    class _Stream:
        def __iter__(self):
            yield "round 0\n"
            raise KeyboardInterrupt

    class _Proc:
        pid = 0

        def __init__(self, cmd: list[str], **_: object) -> None:
            self.name = "watchdog" if "mlip_fed.federation.watchdog" in cmd else "flwr"
            self.stdout = _Stream()
            self.done = False

        def poll(self) -> int | None:
            return 0 if self.done else None

        def kill(self) -> None:
            events.append(f"kill {self.name}")
            self.done = True

        terminate = kill

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", _Proc)
    monkeypatch.setattr(simulation, "stop_superlink", lambda home, timeout_s: events.append(f"stop {timeout_s}"))
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with pytest.raises(simulation.SimulationInterrupted) as stopped:
        simulation.run_flwr_simulation(tmp_path, output_dir=tmp_path / "out", num_supernodes=2)
    assert events == ["kill flwr", f"stop {simulation.INTERRUPT_GRACE_S}", "kill watchdog"]
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.result.interrupted
    assert "interrupted" in (tmp_path / "out" / "flwr_run.log").read_text()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_mlip_simulate_exits_130_with_the_resume_command(tmp_path: Path, monkeypatch, capsys) -> None:
    from mlip_fed.cli import simulate

    def interrupted(app_dir: Path, **kwargs: object) -> SimulationResult:
        out = Path(str(kwargs["output_dir"]))
        raise simulation.SimulationInterrupted(
            SimulationResult(-2, {"completed_rounds": 1}, out, out / "log", 1.0, interrupted=True)
        )

    monkeypatch.setattr(simulation, "run_flwr_simulation", interrupted)
    monkeypatch.setattr(simulate, "visible_gpu_count", lambda: 0)
    argv = ["--sites", "2", "--out", str(tmp_path), "experiment=smoke"]
    assert simulate.main(argv) == simulate.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "interrupted after round 1" in err
    assert shlex.split(err.strip().splitlines()[-1]) == ["mlip-simulate", *argv, "federation.resume=true"]
