"""Start a hospital's ``flower-supernode`` from its validated site config and stay its parent.

Never ``start_client`` (deprecated since Flower 1.13; it speaks only to the legacy ``start_server``, never to ``flower-superlink``).
The launcher execs nothing itself: it keeps the SuperNode as a child so SIGINT/SIGTERM reach it
(a service manager stops the launcher, the SuperNode must stop too) and so Flower's exit codes can
be turned into a sentence a hospital's IT can act on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from mlip_fed.config import ConfigError, SiteConfig
from mlip_fed.deploy.flower_env import OFFLINE_ENV, flower_executable

NODE_CONFIG_KEY = "site-config"

#: Flower's ExitCode values (flwr/supercore/exit/exit_code.py); a process status keeps only the low 8 bits.
_FLOWER_EXITS = {
    302: "the site's private key could not be parsed (auth_private_key must be an EC key in OpenSSH format; "
    "make one with `mlip-certs site`)",
    303: "node authentication needs TLS",
    305: "the SuperLink at {superlink} stayed unreachable after {retries} retries / {wait:.0f} s "
    "(check the address, the firewall, the CA in root_certificates, and that this site's public key is registered "
    "with `flwr supernode register`)",
}
#: Graceful exits after SIGINT / SIGQUIT / SIGTERM.
_GRACEFUL = {1, 2, 3}


def _task_exit(code: int) -> bool:
    """An exit code a ClientApp process logs (it writes to the SuperNode's log): not how the SuperNode ended."""
    return 250 <= code < 300 or code in (607, 608) or 800 <= code < 900


def node_config_arg(site_config_path: Path) -> str:
    path = str(Path(site_config_path).resolve())
    if "'" in path or '"' in path or "\\" in path:
        raise ConfigError(f"site config path {path!r}: quotes and backslashes cannot travel in Flower's --node-config")
    return f"{NODE_CONFIG_KEY}='{path}'"


def supernode_command(site: SiteConfig, site_config_path: Path, executable: str | None = None) -> list[str]:
    """``flower-supernode`` with TLS, node authentication, reconnection limits and the site YAML as node config."""
    return [
        executable or flower_executable("flower-supernode"),
        "--superlink",
        site.superlink,
        "--root-certificates",
        str(site.root_certificates),
        "--auth-supernode-private-key",
        str(site.auth_private_key),
        "--node-config",
        node_config_arg(site_config_path),
        "--max-retries",
        str(site.max_retries),
        "--max-wait-time",
        str(site.max_wait_time_s),
        "--host",
        "127.0.0.1",
        "--port",
        str(site.runtime_port),
    ]


def supernode_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flower-superexec of this env
    return env


def site_supernode_env(site: SiteConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``supernode_env`` behind the site's FAB pin: every ClientApp the SuperNode starts checks the FAB first.

    Writes ``<state_dir>/bin/flwr-clientapp`` (``mlip_fed.deploy.fab_guard``) and puts that folder first on PATH, so
    Flower's SuperExec starts it instead of Flower's own launcher; the approved hashes travel in the environment.
    """
    from mlip_fed.deploy.fab_guard import LAUNCHER_DIR, guard_env, write_launcher

    bin_dir = site.state_dir / LAUNCHER_DIR
    write_launcher(bin_dir)
    return guard_env(supernode_env(base), bin_dir, site.approved_fab_hashes, site.site_id)


#: Flower logs ``Exit Code: <n>`` before exiting; the process status alone is not reliable (a graceful-exit
#: handler racing the SuperExec's shutdown can turn a failed connection into status 0).
_EXIT_LINE = re.compile(r"Exit Code: (\d+)")


@dataclass
class SupernodeExit:
    returncode: int
    #: The last ``Exit Code: n`` Flower logged, if any.
    flower_code: int | None = None


def explain_exit(result: SupernodeExit, site: SiteConfig) -> str | None:
    """A sentence for how the SuperNode ended (None for a clean or signal-requested exit)."""
    code = result.flower_code
    if code is not None and code >= 100:  # Flower's own error codes (0-99 are successes and graceful exits)
        text = _FLOWER_EXITS.get(code, f"flower-supernode failed with Flower exit code {code}; see its log above")
        return text.format(superlink=site.superlink, retries=site.max_retries, wait=site.max_wait_time_s)
    if result.returncode == 0 or result.returncode in _GRACEFUL:
        return None
    if result.returncode < 0:
        return f"flower-supernode was killed by signal {-result.returncode}"
    return f"flower-supernode exited with status {result.returncode}; see its log above"


def run_supernode(cmd: list[str], env: Mapping[str, str] | None = None, out: TextIO | None = None) -> SupernodeExit:
    """Run ``cmd`` as a child in its own session; forward SIGINT/SIGTERM; relay its log to ``out``.

    Its own session: a Ctrl-C in the terminal reaches the launcher once, and the launcher decides
    what the child gets, instead of both racing on the same signal. The log is relayed line by line
    (to stdout by default) so the launcher can read Flower's exit code from it.
    """
    out = sys.stdout if out is None else out
    child = subprocess.Popen(
        cmd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    codes: list[int] = []

    def relay() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            out.write(line)
            out.flush()
            found = _EXIT_LINE.search(line)
            if found and not _task_exit(int(found.group(1))):
                codes.append(int(found.group(1)))

    reader = threading.Thread(target=relay, name="supernode-log", daemon=True)
    reader.start()
    try:
        returncode = child.wait()
        # The SuperNode's SuperExec / ClientApp processes share its session and may outlive it, holding the
        # log pipe open: stop them (our own children's group, by its id) rather than wait on the pipe.
        _stop_group(child.pid)
        reader.join(timeout=5.0)
        return SupernodeExit(returncode, codes[-1] if codes else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()


def _stop_group(pgid: int, grace_s: float = 5.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
