"""A whole deployment on one machine: SuperLink and its Fleet gateway, registered sites through ``mlip-client``,
``flwr run``.

The loopback tests and ``bench/deploy_rounds.py`` drive the same processes a real federation runs, on
127.0.0.1 and free ports, so what they check and measure is the deployment, not a re-enactment: with TLS,
``mlip-superlink`` (the SuperLink on its control port, the gateway on ``port``), the operator's
``flwr`` on the control address, the sites on the gateway address, each pinning the FAB hash that
``mlip-certs fab-hash`` prints. Every process is started here, tracked by PID and stopped by PID (``stop``),
never by name.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlip_fed.deploy.certs import CA_CERT, write_ca, write_server_cert, write_site_keys
from mlip_fed.deploy.fab_guard import CLIENTAPP_COMMAND
from mlip_fed.deploy.flower_env import OFFLINE_ENV, flower_executable
from mlip_fed.deploy.superlink import launcher_command, register_command, write_flwr_config
from mlip_fed.deploy.supernode import node_config_arg
from mlip_fed.federation.simulation import free_port
from mlip_fed.process_tree import descendants, kill_tree, terminate, tree

CONNECTION = "deploy"
#: The app every caller runs: this checkout (the tests and the benchmark run from it).
REPO = Path(__file__).resolve().parents[2]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def deployment_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
    )
    return env


@dataclass
class LocalDeployment:
    """One SuperLink and its sites under ``root``; ``tls=False`` is the insecure baseline (no TLS, no node auth,
    no gateway, no FAB pinning: a bare SuperLink on ``port``)."""

    root: Path
    tls: bool = True
    #: Where the sites connect (the Fleet gateway with TLS).
    port: int = field(default_factory=free_port)
    #: flower-superlink itself (Control and Runtime APIs): the operator's ``flwr`` connects here.
    control_port: int = field(default_factory=free_port)
    #: The Flower app the operator runs; the sites pin its FAB hash unless ``site_yaml`` is told otherwise.
    app_dir: Path = REPO
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.certs = self.root / "certs"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr_home"
        self.env = deployment_env(self.flwr_home)
        self.address = f"127.0.0.1:{self.port}"
        self.control_address = f"127.0.0.1:{self.control_port}" if self.tls else self.address
        self._fab_hash: str | None = None

    # ---------------------------------------------------------------- server
    def start_superlink(self, site_ids: Sequence[str] = ()) -> None:
        """Create certificates (TLS), start the SuperLink behind its gateway, write the operator's ``flwr``
        connection (the control address), register the sites."""
        if self.tls:
            write_ca(self.certs)
            write_server_cert(self.certs)
            for site_id in site_ids:
                write_site_keys(self.certs, site_id)
            cmd = launcher_command(
                self.certs, host="127.0.0.1", port=self.port, control_port=self.control_port, python=sys.executable
            )
            write_flwr_config(self.flwr_home, CONNECTION, self.control_address, self.certs / CA_CERT)
        else:
            cmd = [
                flower_executable("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
            (self.flwr_home).mkdir(parents=True, exist_ok=True)
            (self.flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "{self.address}"\ninsecure = true\n'
            )
        self.procs["superlink"] = self.popen("superlink", cmd)
        self._wait_port()
        if self.tls:
            for site_id in site_ids:
                self.register(site_id)

    def register(self, site_id: str) -> None:
        reg = subprocess.run(
            register_command(self.certs / "sites" / f"{site_id}.pub", CONNECTION, name=site_id),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if reg.returncode != 0:
            raise RuntimeError(f"flwr supernode register {site_id} failed:\n{reg.stdout}{reg.stderr}")

    # ---------------------------------------------------------------- sites
    def fab_hash(self) -> str:
        """The hash the operator hands the sites: ``mlip-certs fab-hash <app_dir>`` (computed once)."""
        if self._fab_hash is None:
            cmd = [sys.executable, "-m", "mlip_fed.cli.certs", "fab-hash", str(self.app_dir)]
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"mlip-certs fab-hash failed:\n{done.stdout}{done.stderr}")
            self._fab_hash = done.stdout.split()[0]
        return self._fab_hash

    def site_yaml(
        self,
        site_id: str,
        manifest: Path,
        *,
        key: str | None = None,
        max_retries: int = 10,
        approved_fab_hashes: Sequence[str] | None = None,
    ) -> Path:
        """A site config as a hospital would write it (relative state dir, its own runtime port, the operator's
        FAB hash pinned unless ``approved_fab_hashes`` says otherwise)."""
        path = self.root / "sites" / f"{site_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "site_id": site_id,
            "superlink": self.address,
            "root_certificates": str(self.certs / CA_CERT),
            "auth_private_key": str(self.certs / "sites" / f"{key or site_id}.key"),
            "data": {"source": "manifest", "manifest": str(manifest), "image_size": 64},
            "device": "cpu",
            "resources": {"num_threads": 1},
            "state_dir": f"state/{site_id}",
            "runtime_port": free_port(),
            "max_retries": max_retries,
            "max_wait_time_s": 60,
        }
        if self.tls:
            pinned = [self.fab_hash()] if approved_fab_hashes is None else list(approved_fab_hashes)
            body["approved_fab_hashes"] = pinned
        path.write_text(yaml.safe_dump(body))
        return path

    def start_site(self, site_id: str, site_yaml: Path) -> subprocess.Popen:
        """TLS: ``mlip-client --site-config`` exactly as a hospital runs it. Insecure: the same SuperNode, no TLS."""
        if self.tls:
            cmd = [sys.executable, "-m", "mlip_fed.cli.client", "--site-config", str(site_yaml)]
        else:
            site = yaml.safe_load(site_yaml.read_text())
            cmd = [
                flower_executable("flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--node-config",
                node_config_arg(site_yaml),
                "--host",
                "127.0.0.1",
                "--port",
                str(site["runtime_port"]),
            ]
        proc = self.popen(site_id, cmd, append=site_id in self.procs)
        self.procs[site_id] = proc
        return proc

    def clientapp_pids(self, site_id: str) -> list[int]:
        """The site's ClientApp processes (with TLS: the FAB-checking launcher, ``mlip_fed.deploy.fab_guard``)."""
        return [
            p
            for p in descendants(self.procs[site_id].pid)
            if any(name in cmdline(p) for name in (CLIENTAPP_COMMAND, "mlip_fed.deploy.fab_guard"))
        ]

    def kill_site(self, site_id: str) -> list[int]:
        """SIGKILL the site's launcher, SuperNode, SuperExec and ClientApps (by PID): a crash, not a shutdown."""
        proc = self.procs[site_id]
        pids = kill_tree(proc.pid)
        proc.wait(timeout=10)
        return pids

    # ---------------------------------------------------------------- the run
    def flwr_run(self, app_dir: Path, run_config: Path, timeout_s: float = 900) -> subprocess.Popen:
        """``flwr run <app> deploy --stream`` in the background (its log in ``logs/flwr_run.log``)."""
        cmd = [
            flower_executable("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            str(run_config),
        ]
        proc = self.popen("flwr_run", cmd, cwd=app_dir)
        self.procs["flwr_run"] = proc
        return proc

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every process started here and its descendants (by PID); SIGKILL what is left after ``grace_s``."""
        terminate(tree(proc.pid for proc in self.procs.values() if proc.poll() is None), grace_s)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.wait(timeout=10)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # ---------------------------------------------------------------- helpers
    def popen(self, name: str, cmd: list[str], cwd: Path | None = None, append: bool = False) -> subprocess.Popen:
        """Start ``cmd`` with the deployment's environment, its output in ``logs/<name>.log``; tracked for ``stop``."""
        with (self.logs / f"{name}.log").open("a" if append else "w") as handle:
            return subprocess.Popen(
                cmd, env=self.env, cwd=cwd or self.root, stdout=handle, stderr=subprocess.STDOUT, text=True
            )

    def _wait_port(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        link = self.procs["superlink"]
        while time.monotonic() < deadline:
            if link.poll() is not None:
                raise RuntimeError(f"SuperLink exited with {link.returncode}:\n{self.log_tail('superlink')}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"SuperLink did not listen on {self.address} within {timeout_s:.0f} s")
