"""The images' entry points, run natively (no Docker engine here): the Dockerfiles and compose file must
not drift from the CLIs they call, the pins from the tested environment, or the certificate names.

Container paths (/certs, /config, /data, /state) are mapped onto a tmp dir; ports onto free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlip_fed.config import SiteConfig
from mlip_fed.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, write_ca, write_server_cert, write_site_keys
from mlip_fed.deploy.superlink import launcher_command, superlink_command
from mlip_fed.federation.simulation import free_port
from mlip_fed.process_tree import terminate, tree

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


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line in a lock file (names normalised as pip does)."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): v for name, v in pins}


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_image_installs_the_lock_and_user_is_not_root(name: str) -> None:
    """No version typed in a Dockerfile: it installs the lock file `make venv` installs, hash-checked."""
    steps = instructions(DOCKER / name)
    (base,) = steps["FROM"]
    py = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", base)
    assert py, base
    assert (int(py.group(1)), int(py.group(2))) == sys.version_info[:2], f"{name} base {base} vs {sys.version}"
    runs = " ".join(steps["RUN"])
    assert not re.findall(r"[A-Za-z0-9_.-]+==\d", runs), f"{name} types a version: {runs}"
    args = dict(a.split("=", 1) for a in steps["ARG"] if "=" in a)
    assert (ROOT / args["LOCK"]).is_file(), args["LOCK"]
    assert "pip install --require-hashes --no-deps ${TORCH_SOURCE} -r /opt/mlip-fed/requirements.lock" in runs
    assert "pip install --no-deps --no-build-isolation /opt/mlip-fed" in runs
    (user,) = steps["USER"]
    assert user not in {"root", "0"}, f"{name} runs as {user}"
    assert any("useradd" in r and user in r for r in steps["RUN"]), f"{name}: user {user} is never created"
    assert "HEALTHCHECK" in steps, name


def test_tested_environment_is_the_cpu_lock() -> None:
    """The .venv running these tests holds exactly the CPU lock's versions (what the images install)."""
    from importlib.metadata import distributions

    locked = locked_versions(ROOT / "requirements-cpu.lock")
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in distributions()}
    installed.pop("mlip-fed", None)
    differ = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not differ, f"lock vs .venv (locked, installed): {differ}; run make venv"
    extra = sorted(set(installed) - set(locked) - {"pip"})
    assert not extra, f"installed but not locked: {extra}"


@pytest.mark.parametrize("lock", ["requirements-cpu.lock", "requirements-cuda.lock"])
def test_lock_satisfies_pyproject(lock: str) -> None:
    """Every dependency pyproject.toml declares is locked at a version its specifier allows (else: make lock)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    locked = locked_versions(ROOT / lock)
    for text in declared:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in locked, f"{lock}: {req.name} (pyproject.toml) is not locked; run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{lock}: {name}=={locked[name]} vs {req}"
    assert all("--hash=sha256:" in block for block in (ROOT / lock).read_text().split("==")[1:]), f"{lock}: hashes"


def test_server_entrypoint_is_the_superlink_launcher(tmp_path: Path) -> None:
    """The ENTRYPOINT, with container paths mapped, is what ``launcher_command`` builds: the Fleet gateway on the
    exposed port, flower-superlink (``superlink_command``, TLS + node auth) on the container's 127.0.0.1 only."""
    from mlip_fed.cli.superlink import build_parser

    entry = exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0])
    certs = tmp_path / "certs"
    write_ca(certs)
    write_server_cert(certs)
    host = to_host(entry, container_paths(tmp_path))
    db = tmp_path / "state" / "superlink.db"
    built = launcher_command(f"{certs}/", host="0.0.0.0", port=9092, control_port=9093, database=db)
    assert host == [*built, "--flwr-connection", "local"]
    args = build_parser().parse_args(host[3:])
    link = superlink_command(args.certs, host="127.0.0.1", port=args.control_port, database=args.database)
    assert link[link.index("--host") + 1] == "127.0.0.1" and "--enable-supernode-auth" in link
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        assert f"{certs}/{name}" in link, name
    (expose,) = instructions(DOCKER / "Dockerfile.server")["EXPOSE"]
    assert entry[entry.index("--port") + 1] == expose != entry[entry.index("--control-port") + 1]


def prepare_site_mounts(tmp_path: Path) -> list[str]:
    """The compose mounts of one site (certs, its key, site.yaml, data) laid under tmp_path; returns CMD mapped."""
    from mlip_fed.config import DataConfig, SyntheticDataConfig
    from mlip_fed.pipeline import synthetic_manifests

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
    return to_host(exec_form(instructions(DOCKER / "Dockerfile.site")["CMD"][0]), mapping)


def test_site_entrypoint_checks_the_example_site_config(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD + ``--check`` against docker/site.example.yaml with its mounts mapped onto tmp_path."""
    steps = instructions(DOCKER / "Dockerfile.site")
    entry = exec_form(steps["ENTRYPOINT"][0])
    assert entry == ["mlip-client"] and (BIN / "mlip-client").is_file()
    example = yaml.safe_load((DOCKER / "site.example.yaml").read_text())
    args = prepare_site_mounts(tmp_path)
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
    # What a non-root container writes must be a named volume (Docker creates missing bind folders as root).
    for name, service in services.items():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if not volume.endswith(":ro"):
                assert not source.startswith((".", "/")), f"{name}: writable {target} is a bind mount of {source}"
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


@pytest.mark.integration
def test_server_entrypoint_runs_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """The SuperLink and its gateway started from the ENTRYPOINT (loopback, free ports) answer the image's HEALTHCHECK
    over TLS."""
    import time

    certs = tmp_path / "certs"
    write_ca(certs)
    write_server_cert(certs)
    (tmp_path / "state").mkdir()
    entry = to_host(exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0]), container_paths(tmp_path))
    port = free_port()
    entry[entry.index("--host") + 1] = "127.0.0.1"
    entry[entry.index("--port") + 1] = str(port)
    entry[entry.index("--control-port") + 1] = str(free_port())
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
    finally:  # the launcher, the SuperLink and the SuperExec it started, by PID
        terminate(tree([link.pid]), grace_s=20)
        link.wait(timeout=10)


# ---------------------------------------------------------------- each image's environment, replayed
#: The one build argument replaced: the PyTorch CPU index is not reachable here, so pip finds the same torch
#: wheel through this machine's pip configuration; ``--require-hashes`` proves it is the locked file.
REPLAY_BUILD_ARGS = {"TORCH_SOURCE": ""}
#: RUN commands about users and folders, not the Python environment (test_image_installs_the_lock... checks them).
NOT_REPLAYED = {"useradd", "mkdir", "chown"}
#: A cache setting, not part of what gets installed; replaying it would re-download every wheel on every run.
NOT_REPLAYED_ENV = {"PIP_NO_CACHE_DIR"}


def ordered_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if not line.startswith("#"))
    )
    return [(w.upper(), r.strip()) for w, _, r in (line.strip().partition(" ") for line in text.splitlines()) if w]


class ReplayedImage:
    """What a Dockerfile's ARG/ENV/COPY/RUN steps produce, with the container's paths mapped under ``root``."""

    def __init__(self, dockerfile: Path, root: Path, built: dict[tuple, ReplayedImage] | None = None) -> None:
        """``built``: images already replayed, by their build steps; identical steps share one environment."""
        steps = ordered_instructions(dockerfile)
        self.env = {
            k: v for word, rest in steps if word == "ENV" for k, v in (t.split("=", 1) for t in shlex.split(rest))
        }
        key = tuple((word, rest) for word, rest in steps if word in {"ARG", "COPY", "RUN"})
        twin = (built or {}).get(key)
        if twin is not None:
            self.root, self.venv, self.install_log = twin.root, twin.venv, twin.install_log
            return
        self.root = root
        self.venv = root / "venv"
        self.install_log: list[list[str]] = []
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        args: dict[str, str] = {}
        for word, rest in steps:
            if word == "ARG":
                name, _, default = rest.partition("=")
                args[name] = REPLAY_BUILD_ARGS.get(name, " ".join(shlex.split(default)))
            elif word == "COPY":
                *sources, dest = shlex.split(self.substitute(rest, args))
                self.copy(sources, dest)
            elif word == "RUN":
                for command in self.substitute(rest, args).split("&&"):
                    self.run(shlex.split(command))
        if built is not None:
            built[key] = self

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"

    def substitute(self, text: str, args: dict[str, str]) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)

    def host(self, container_path: str) -> Path:
        system = f"/usr/local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
        if container_path.startswith(system):
            return self.site_packages / container_path[len(system) :].lstrip("/")
        return self.root / "fs" / container_path.lstrip("/")

    def copy(self, sources: list[str], dest: str) -> None:
        import shutil

        target = self.host(dest)
        for source in sources:
            src = ROOT / source
            into = target / src.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, into)

    def run(self, argv: list[str]) -> None:
        if argv[0] in NOT_REPLAYED:
            return
        assert argv[0] in {"pip", "python"}, f"RUN {argv[0]} is neither replayed nor knowingly skipped: {argv}"
        prefix = [str(self.venv / "bin" / "python")] + (["-m", "pip"] if argv[0] == "pip" else [])
        mapped = [str(self.host(a)) if a.startswith(("/opt/", "/usr/")) else a for a in argv[1:]]
        env = {**os.environ, **{k: v for k, v in self.env.items() if k not in NOT_REPLAYED_ENV}}
        done = subprocess.run([*prefix, *mapped], cwd=self.root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"RUN {' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        self.install_log.append(argv)

    def runtime_env(self, **extra: str) -> dict[str, str]:
        """The image's ENV, its venv first on PATH, and nothing of the checkout on the import path."""
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
        env.update(self.env)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **extra}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReplayedImage]:
    built: dict[tuple, ReplayedImage] = {}  # both images install the same lock the same way: one replay
    return {
        name: ReplayedImage(DOCKER / name, tmp_path_factory.mktemp(name.replace(".", "_")), built)
        for name in ("Dockerfile.server", "Dockerfile.site")
    }


@pytest.mark.integration
@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.site"])
def test_image_environment_imports_the_apps(images: dict[str, ReplayedImage], name: str, tmp_path: Path) -> None:
    """The installed project (not the checkout) imports the ServerApp and ClientApp and all they import."""
    image = images[name]
    assert any(a[:2] == ["pip", "install"] and "--require-hashes" in a for a in image.install_log), image.install_log
    code = "import server.app, client.app, mlip_fed, opacus, PIL; print(mlip_fed.__file__)"
    done = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=image.runtime_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(image.site_packages) in done.stdout, f"imported from the checkout, not the image: {done.stdout}"
    checked = subprocess.run(
        [str(image.venv / "bin" / "python"), "-m", "pip", "check"],
        env=image.runtime_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout


@pytest.mark.integration
def test_server_image_entrypoint_and_run_config_paths(images: dict[str, ReplayedImage], tmp_path: Path) -> None:
    """The launcher and flower-superlink from the image answer --help; relative run paths land under MLIP_FED_HOME,
    never in site-packages, and without MLIP_FED_HOME they are refused by name."""
    image = images["Dockerfile.server"]
    entry = exec_form(instructions(DOCKER / "Dockerfile.server")["ENTRYPOINT"][0])
    for argv, needle in (
        ([entry[0], *entry[1:3]], "--control-port"),
        (["flower-superlink"], "--enable-supernode-auth"),
    ):
        helped = subprocess.run(
            [str(image.venv / "bin" / argv[0]), *argv[1:], "--help"],
            cwd=tmp_path,
            env=image.runtime_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert helped.returncode == 0 and needle in helped.stdout, helped.stderr[-2000:]
    assert image.env.get("MLIP_FED_HOME") == "/runs"
    code = (
        "from mlip_fed.federation.run_config import experiment_from_run_config as f; r = f({}); "
        "print(r.output_dir); print(r.cfg.data.root)"
    )
    python = str(image.venv / "bin" / "python")
    home = tmp_path / "runs"
    ok = subprocess.run(
        [python, "-c", code],
        cwd=tmp_path,
        env=image.runtime_env(MLIP_FED_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    for line in ok.stdout.split():
        assert line.startswith(str(home)), ok.stdout
    env = image.runtime_env()
    env.pop("MLIP_FED_HOME")
    refused = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "output_dir = " in refused.stderr and "MLIP_FED_HOME" in refused.stderr


@pytest.mark.integration
def test_site_image_entrypoint_checks_decoded_data(images: dict[str, ReplayedImage], tmp_path: Path) -> None:
    """ENTRYPOINT + CMD + --check from the image's environment, decoding every image (PIL, pydicom)."""
    image = images["Dockerfile.site"]
    steps = instructions(DOCKER / "Dockerfile.site")
    entry = exec_form(steps["ENTRYPOINT"][0])
    args = prepare_site_mounts(tmp_path)
    checked = subprocess.run(
        [str(image.venv / "bin" / entry[0]), *args, "--check"],
        cwd=tmp_path,
        env=image.runtime_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    example = yaml.safe_load((DOCKER / "site.example.yaml").read_text())
    assert f"site {example['site_id']}: config OK" in checked.stdout
