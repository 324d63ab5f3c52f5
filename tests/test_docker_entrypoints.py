"""The images' entry points, run natively (no Docker engine here): the Dockerfiles and compose file must
not drift from the CLIs they call, the pins from the tested environment, or the certificate names.

Container paths (/certs, /config, /data, /state) are mapped onto a tmp dir; ports onto free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from mlip_fed.config import SiteConfig
from mlip_fed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, write_ca, write_server_cert, write_site_keys
from mlip_fed.deploy.superlink import superlink_command
from mlip_fed.federation.simulation import descendants, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def instructions(dockerfile: Path) -> dict[str, list[str]]:
    """Instruction -> arguments (continuation lines joined, comments dropped); repeated instructions kept in order."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if not line.startswith("#"))
    )
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def healthcheck_command(dockerfile: Path) -> list[str]:
    (health,) = instructions(dockerfile)["HEALTHCHECK"]
    command = health[health.index("CMD ") + 4 :].split(" || ")[0]
    return shlex.split(command)


def container_paths(tmp: Path) -> dict[str, str]:
    return {
        "/certs/": f"{tmp}/certs/",
        "/config/": f"{tmp}/config/",
        "/data/": f"{tmp}/data/",
        "/state": f"{tmp}/state",
    }


def to_host(args: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for container, host in mapping.items():
            arg = arg.replace(container, host)
        out.append(arg)
    return out


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_pins_match_the_tested_environment_and_user_is_not_root(name: str) -> None:
    steps = instructions(DOCKER / name)
    (base,) = steps["FROM"]
    py = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", base)
    assert py, base
    assert (int(py.group(1)), int(py.group(2))) == sys.version_info[:2], f"{name} base {base} vs {sys.version}"
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", " ".join(steps["RUN"])))
    assert {"torch", "flwr", "monai", "pydantic", "cryptography", "transformers"} <= set(pins), pins
    for package, pinned in pins.items():
        installed = version(package).split("+")[0]  # torch's local tag (+cpu) is the wheel index, not the version
        assert installed == pinned, f"{name}: {package}=={pinned} but .venv has {installed}"
    (user,) = steps["USER"]
    assert user not in {"root", "0"}, f"{name} runs as {user}"
    assert any("useradd" in r and user in r for r in steps["RUN"]), f"{name}: user {user} is never created"
    assert "HEALTHCHECK" in steps, name


def test_server_entrypoint_is_superlink_command(tmp_path: Path) -> None:
    """The ENTRYPOINT, with container paths mapped, is exactly what ``superlink_command`` builds (and the CLI parses it)."""
    entry = exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0])
    certs = tmp_path / "certs"
    write_ca(certs)
    write_server_cert(certs)
    host = to_host(entry, container_paths(tmp_path))
    built = superlink_command(certs, host="0.0.0.0", port=9092, database=tmp_path / "state" / "superlink.db")
    assert host[0] == "flower-superlink" and Path(built[0]).name == "flower-superlink"
    assert host[1:] == built[1:]
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        assert f"/certs/{name}" in entry, name
    (expose,) = instructions(DOCKER / "Dockerfile.server")["EXPOSE"]
    assert entry[entry.index("--port") + 1] == expose


def test_site_entrypoint_checks_the_example_site_config(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD + ``--check`` against docker/site.example.yaml with its mounts mapped onto tmp_path."""
    from mlip_fed.config import DataConfig, SyntheticDataConfig
    from mlip_fed.pipeline import synthetic_manifests

    steps = instructions(DOCKER / "Dockerfile.site")
    entry, cmd = exec_form(steps["ENTRYPOINT"][0]), exec_form(steps["CMD"][0])
    assert entry == ["mlip-client"] and (BIN / "mlip-client").is_file()
    mapping = container_paths(tmp_path)
    example = yaml.safe_load((DOCKER / "site.example.yaml").read_text())
    write_ca(tmp_path / "certs")
    keys = write_site_keys(tmp_path / "certs", example["site_id"])
    keys.private.rename(tmp_path / "certs" / "site.key")  # compose mounts the site's key as /certs/site.key
    manifest = synthetic_manifests(
        DataConfig(root=tmp_path / "synth", synthetic=SyntheticDataConfig(num_sites=1, studies_per_site=8))
    )[0]
    (tmp_path / "data").symlink_to(manifest.parent)  # compose mounts the site's data folder as /data
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "site.yaml").write_text(to_host([(DOCKER / "site.example.yaml").read_text()], mapping)[0])
    args = to_host(cmd, mapping)
    checked = subprocess.run(
        [str(BIN / entry[0]), *args, "--check", "--no-decode"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"site {example['site_id']}: config OK" in checked.stdout
    printed = subprocess.run(
        [str(BIN / entry[0]), *args, "--print-command"], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    assert f"--superlink {example['superlink']}" in printed.stdout and "--auth-supernode-private-key" in printed.stdout
    # The health check probes the SuperNode's runtime port: the one the example config (or its default) sets.
    port = int(example.get("runtime_port", SiteConfig.model_fields["runtime_port"].default))
    assert f"'127.0.0.1', {port})" in " ".join(healthcheck_command(DOCKER / "Dockerfile.site"))


def test_site_healthcheck_command_tells_listening_from_closed() -> None:
    command = healthcheck_command(DOCKER / "Dockerfile.site")
    assert command[0] == "python"
    port = free_port()
    probe = [sys.executable, command[1], re.sub(r"'127\.0\.0\.1', \d+\)", f"'127.0.0.1', {port})", command[2])]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0
    with socket.create_server(("127.0.0.1", port)):
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def test_compose_mounts_what_the_images_read() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    server_targets = {v.split(":")[1] for v in services["superlink"]["volumes"]}
    entry = " ".join(exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0]))
    for path in re.findall(r"(/certs/\S+|/state)(?=\s|/|$)", entry):
        assert path in server_targets or path.rsplit("/", 1)[0] in server_targets, path
    example = yaml.safe_load((DOCKER / "site.example.yaml").read_text())
    sites = [name for name in services if name != "superlink"]
    assert len(sites) == 3
    for name in sites:
        targets = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        for needed in (example["root_certificates"], example["auth_private_key"], "/config/site.yaml", "/data"):
            assert needed in targets, (name, needed)
        assert example["state_dir"] in targets, name
        assert targets["/certs/site.key"] == f"./certs/sites/{name}.key", name  # each site sees only its own key
        assert all(v.endswith(":ro") for v in services[name]["volumes"] if "/certs/" in v), name
    assert example["superlink"].split(":")[0] == "superlink" and example["superlink"].endswith(":9092")


@pytest.mark.integration
def test_server_entrypoint_runs_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """The SuperLink started from the ENTRYPOINT (loopback, free port) answers the image's HEALTHCHECK over TLS."""
    import os
    import signal
    import time

    certs = tmp_path / "certs"
    write_ca(certs)
    write_server_cert(certs)
    (tmp_path / "state").mkdir()
    entry = to_host(exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0]), container_paths(tmp_path))
    port = free_port()
    entry[entry.index("--host") + 1] = "127.0.0.1"
    entry[entry.index("--port") + 1] = str(port)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the SuperLink starts flower-superexec by name
    command = healthcheck_command(DOCKER / "Dockerfile.server")
    code = command[2].replace("localhost:9092", f"localhost:{port}").replace("/certs/", f"{certs}/")
    assert code != command[2]
    health = [sys.executable, "-c", code]
    link = subprocess.Popen(
        [str(BIN / entry[0]), *entry[1:]], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        ok = False
        while time.monotonic() < deadline and link.poll() is None:
            if subprocess.run(health, capture_output=True, timeout=30).returncode == 0:
                ok = True
                break
            time.sleep(1)
        assert ok, f"HEALTHCHECK never passed (SuperLink exit status {link.poll()})"
    finally:  # the SuperLink and the SuperExec it started, by PID
        pids = [*reversed(descendants(link.pid)), link.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            link.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        link.wait(timeout=10)
