"""Loopback deployment: a TLS SuperLink with node authentication, three hospitals started through
``mlip-client``, ``flwr run`` of the ``smoke`` experiment, results checked; an unregistered fourth node is
refused. Everything binds 127.0.0.1 on free ports and every process started here is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlip_fed.deploy.certs import CA_CERT, write_ca, write_server_cert, write_site_keys
from mlip_fed.deploy.superlink import register_command, superlink_command, write_flwr_config
from mlip_fed.federation.simulation import descendants, free_port, write_run_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital_a", "hospital_b", "hospital_c")
OVERRIDES = [
    "data.synthetic.num_sites=3",
    "data.synthetic.studies_per_site=16",
    "train.num_threads=1",
    "train.max_steps=2",
    "federation.min_available_nodes=3",
    "federation.min_train_nodes=3",
    "federation.round_timeout_s=240",
]


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
    )
    return env


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"SuperLink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"SuperLink did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process we started and its descendants (by PID), SIGKILL what is left after 20 s."""
    pids = []
    for proc in procs:
        if proc.poll() is None:
            pids += [*reversed(descendants(proc.pid)), proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.wait(timeout=10)


def _site_yaml(tmp: Path, site_id: str, port: int, manifest: Path, certs: Path, retries: int = 5) -> Path:
    path = tmp / "sites" / f"{site_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "site_id": site_id,
        "superlink": f"127.0.0.1:{port}",
        "root_certificates": str(certs / CA_CERT),
        "auth_private_key": str(certs / "sites" / f"{site_id}.key"),
        "data": {"source": "manifest", "manifest": str(manifest), "image_size": 64},
        "device": "cpu",
        "resources": {"num_threads": 1},
        "state_dir": f"state/{site_id}",  # relative: resolved against the YAML's folder
        "runtime_port": free_port(),
        "max_retries": retries,
        "max_wait_time_s": 30,
    }
    path.write_text(yaml.safe_dump(body))
    return path


def test_loopback_deployment_tls_node_auth(tmp_path: Path) -> None:
    from mlip_fed.cli.hydra_config import compose_experiment
    from mlip_fed.pipeline import synthetic_manifests

    certs, flwr_home, out = tmp_path / "certs", tmp_path / "flwr_home", tmp_path / "out"
    write_ca(certs)
    write_server_cert(certs)
    for site_id in (*SITES, "rogue"):
        write_site_keys(certs, site_id)
    data_root = tmp_path / "synth"
    overrides = [*OVERRIDES, f"data.root={data_root}"]
    cfg = compose_experiment(["experiment=smoke", *overrides])
    manifests = synthetic_manifests(cfg.data)  # each hospital gets one generated site as its own CSV manifest

    port = free_port()
    env = _env(flwr_home)
    write_flwr_config(flwr_home, "deploy", f"127.0.0.1:{port}", certs / CA_CERT)
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        link_log = logs / "superlink.log"
        with link_log.open("w") as handle:
            link = subprocess.Popen(
                superlink_command(certs, port=port), env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT
            )
        procs.append(link)
        _wait_port(port, link, link_log)
        for site_id in SITES:
            reg = subprocess.run(
                register_command(certs / "sites" / f"{site_id}.pub", "deploy", name=site_id),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reg.returncode == 0, reg.stdout + reg.stderr

        clients = {}
        for site_id, manifest in zip(SITES, manifests, strict=True):
            site_yaml = _site_yaml(tmp_path, site_id, port, manifest, certs)
            with (logs / f"{site_id}.log").open("w") as handle:
                clients[site_id] = subprocess.Popen(
                    [sys.executable, "-m", "mlip_fed.cli.client", "--site-config", str(site_yaml)],
                    env=env,
                    cwd=tmp_path,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            procs.append(clients[site_id])

        # An unregistered key is refused: the launcher gives up after its retries and says why.
        rogue_yaml = _site_yaml(tmp_path, "rogue", port, manifests[0], certs, retries=1)
        rogue = subprocess.run(
            [sys.executable, "-m", "mlip_fed.cli.client", "--site-config", str(rogue_yaml)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rogue.returncode != 0, rogue.stdout + rogue.stderr
        assert "rogue" in rogue.stderr and "registered" in rogue.stderr, rogue.stderr[-2000:]

        run_config = write_run_config(tmp_path / "run_config.toml", "smoke", overrides, out, 2)
        run = subprocess.run(
            [shutil_which("flwr"), "run", str(ROOT), "deploy", "--stream", "--run-config", str(run_config)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        (logs / "flwr_run.log").write_text(run.stdout + run.stderr)
        results_file = out / "results.json"
        assert results_file.is_file(), f"no results.json; flwr run said:\n{(run.stdout + run.stderr)[-4000:]}"
        results = json.loads(results_file.read_text())
        assert results["status"] == "completed", results
        assert results["aggregated_rounds"] == 2, results
        for site_id in SITES:  # each hospital trained under its own id, in its own state dir
            assert (tmp_path / "sites" / "state" / site_id / "bank_history.jsonl").is_file(), site_id
        for site_id, proc in clients.items():
            assert proc.poll() is None, f"{site_id} exited early:\n{(logs / f'{site_id}.log').read_text()[-3000:]}"
    finally:
        _stop(procs)
    for proc in procs:
        assert proc.poll() is not None


def shutil_which(name: str) -> str:
    import shutil

    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} not installed next to {sys.executable}"
    return found


if __name__ == "__main__":  # a readable trace when debugging: python tests/test_deploy_loopback.py
    sys.exit(pytest.main([__file__, "-x", "-s", *shlex.split(os.environ.get("PYTEST_ARGS", ""))]))
