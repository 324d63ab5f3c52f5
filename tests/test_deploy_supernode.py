"""The launcher forwards SIGTERM to the SuperNode and turns Flower's exit codes into a sentence."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlip_fed.config import SiteConfig
from mlip_fed.deploy.supernode import SupernodeExit, explain_exit, run_supernode

#: Stands in for flower-supernode: reports the signal it got into a file, then logs a Flower-style exit.
FAKE_SUPERNODE = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    def stop(signum, frame):
        Path(sys.argv[1]).write_text(str(signum))
        print("INFO: SuperNode terminated gracefully.", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _site(tmp_path: Path) -> SiteConfig:
    return SiteConfig.model_construct(superlink="127.0.0.1:9092", max_retries=2, max_wait_time_s=5.0)


def test_sigterm_reaches_the_supernode(tmp_path: Path) -> None:
    marker = tmp_path / "got_signal"
    launcher = textwrap.dedent(
        f"""
        import sys
        from mlip_fed.deploy.supernode import run_supernode
        result = run_supernode([sys.executable, "-c", {FAKE_SUPERNODE!r}, {str(marker)!r}])
        sys.exit(result.returncode)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # the child is up and its handler installed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 3  # the child's graceful SIGTERM exit, passed through
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert marker.read_text() == str(int(signal.SIGTERM))


def test_exit_code_read_from_the_log_even_when_status_is_zero(tmp_path: Path) -> None:
    script = "print('ERROR: Exit Code: 305'); print('Failed to initialize the connection to the SuperLink.')"
    out = io.StringIO()
    start = time.monotonic()
    result = run_supernode([sys.executable, "-c", script], out=out)
    assert time.monotonic() - start < 30
    assert result == SupernodeExit(0, 305)
    assert "Exit Code: 305" in out.getvalue()  # the site's operator still sees Flower's own log
    reason = explain_exit(result, _site(tmp_path))
    assert reason is not None and "127.0.0.1:9092 stayed unreachable after 2 retries" in reason
    assert "flwr supernode register" in reason


def test_graceful_and_signal_exits(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert explain_exit(SupernodeExit(0, None), site) is None
    assert explain_exit(SupernodeExit(3, 3), site) is None  # SIGTERM, graceful
    assert "signal 9" in (explain_exit(SupernodeExit(-9, None), site) or "")
    assert "status 7" in (explain_exit(SupernodeExit(7, None), site) or "")
