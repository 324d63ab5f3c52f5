"""Issue #14: nobody but the operator registers a node or starts a run, and a site runs only the FAB it pinned.

Fast tests: the gateway's route table, the SuperLink refusing a public address, the site YAML's
``approved_fab_hashes``, the FAB check around Flower's own ``install_from_fab`` (a FAB whose ClientApp would
leave a marker file at import is refused before it is unpacked), and tripwires on the Flower 1.42 facts the
guard relies on.

Loopback test (marker ``integration``): ``mlip-superlink`` (the SuperLink on 127.0.0.1:control,
the Fleet gateway on another port), three registered hospitals started through ``mlip-client`` on the gateway
address, two pinning the FAB hash ``mlip-certs fab-hash`` prints and one pinning another; an outsider holding
the CA certificate and a key pair of its own tries ``flwr supernode register`` and ``flwr run`` of its own app
through the sites' address and is refused; the operator runs one round on the control address; the hospital
that did not pin the FAB refuses it (log line naming the hash, error reply) and the round aggregates the other
two. Everything binds 127.0.0.1 on free ports; every process is stopped by PID (``LocalDeployment.stop``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEPLOY_OVERRIDES, DEPLOY_SITES, loopback_deployment

from mlip_fed.config import SiteConfig
from mlip_fed.deploy import fab_guard
from mlip_fed.deploy.gateway import FLEET_ROUTES, allowed
from mlip_fed.deploy.superlink import superlink_command

ROOT = Path(__file__).resolve().parents[1]


def rogue_app(folder: Path, marker: Path) -> Path:
    """A Flower app of an outsider's: importing its ClientApp module writes ``marker``."""
    app = folder / "rogueapp"
    (app / "rogueapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "rogueapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "rogue"\n\n'
        '[tool.flwr.app.components]\nserverapp = "rogueapp.server:app"\nclientapp = "rogueapp.client:app"\n'
    )
    (app / "rogueapp" / "__init__.py").write_text("")
    (app / "rogueapp" / "client.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('rogue code ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    (app / "rogueapp" / "server.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    return app


# ---------------------------------------------------------------------------- fast
def test_gateway_forwards_the_fleet_api_only() -> None:
    for route in FLEET_ROUTES:
        assert allowed("POST", route) and not allowed("GET", route)
    assert allowed("GET", "/health") and allowed("HEAD", "/health") and not allowed("POST", "/health")
    refused = [
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/control/stop-run",
        "/v1/control/list-nodes",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-messages",
        "/v1/fleet/register-node",  # self-registration: sites are registered by the operator only
        "/v1/fleet/unregister-node",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/activate-node/",
        "/docs",
        "/openapi.json",
        "/",
    ]
    assert not [path for path in refused if allowed("POST", path) or allowed("GET", path)]


def test_gateway_refuses_before_the_superlink_and_reports_it_unreachable(tmp_path: Path) -> None:
    """The ASGI app itself: a refused route never leaves the gateway; an allowed one with no SuperLink is a 502."""
    import asyncio

    import httpx

    from mlip_fed.deploy.certs import write_ca
    from mlip_fed.deploy.gateway import FleetGateway
    from mlip_fed.federation.simulation import free_port

    cert, _ = write_ca(tmp_path)
    gateway = FleetGateway(f"https://127.0.0.1:{free_port()}", cert, timeout_s=5)

    async def calls() -> list[int]:
        transport = httpx.ASGITransport(app=gateway, client=("203.0.113.7", 51234))
        async with httpx.AsyncClient(transport=transport, base_url="https://gateway") as client:
            refused = await client.post("/v1/control/start-run", content=b"x")
            unreachable = await client.post("/v1/fleet/pull-messages", content=b"x")
        await gateway.aclose()
        return [refused.status_code, unreachable.status_code]

    assert asyncio.run(calls()) == [403, 502]


def test_superlink_binds_this_host_only(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "10.0.0.5", "::"):
        with pytest.raises(ValueError, match="127.0.0.1 only"):
            superlink_command(tmp_path, host=host)


def test_site_yaml_pins_fab_hashes() -> None:
    base = {
        "site_id": "h1",
        "superlink": "link:9092",
        "root_certificates": "ca.crt",
        "auth_private_key": "h1.key",
        "data": {"source": "manifest", "manifest": "m.csv"},
        "state_dir": "state",
    }
    assert SiteConfig.model_validate(base).approved_fab_hashes == []
    digest = "AB" * 32
    site = SiteConfig.model_validate({**base, "approved_fab_hashes": [digest, digest.lower()]})
    assert site.approved_fab_hashes == ["ab" * 32]
    with pytest.raises(ValueError, match=r"(?s)approved_fab_hashes.*64 hex digits"):
        SiteConfig.model_validate({**base, "approved_fab_hashes": ["2bd06b91"]})


def test_guard_refuses_an_unpinned_fab_before_unpacking_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own install/load steps, wrapped as the site's launcher wraps them: nothing of a refused FAB lands."""
    from flwr.common.config import get_project_dir
    from flwr.supernode.runtime import run_clientapp as runtime

    marker = tmp_path / "marker"
    fab = fab_guard.build_fab(rogue_app(tmp_path, marker), tmp_path / "fabs")
    content = fab.read_bytes()
    digest = fab_guard.fab_sha256(content)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))

    install, project_dir = fab_guard.guarded(runtime.install_from_fab, get_project_dir, {"0" * 64}, "h1")
    with pytest.raises(fab_guard.FabNotApproved, match=f"h1: refused FAB sha256={digest}"):
        install(content, skip_prompt=True)
    with pytest.raises(fab_guard.FabNotApproved):  # nothing approved was installed in this process
        project_dir("rogue/rogueapp", "1.0.0", digest)
    assert not (tmp_path / "flwr_home").exists()

    install, project_dir = fab_guard.guarded(runtime.install_from_fab, get_project_dir, {digest}, "h1")
    installed = install(content, skip_prompt=True)
    assert (Path(installed) / "rogueapp" / "client.py").is_file()
    with pytest.raises(fab_guard.FabNotApproved, match="claimed hash"):
        project_dir("rogue/rogueapp", "1.0.0", "f" * 64)
    assert project_dir("rogue/rogueapp", "1.0.0", digest) == Path(installed)
    assert not marker.exists()  # unpacked, never imported


def test_launcher_comes_first_on_the_supernodes_path(tmp_path: Path) -> None:
    path = fab_guard.write_launcher(tmp_path / "my bin", python="/opt/py 3/bin/python")
    assert path.name == "flwr-clientapp" and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert f"exec '/opt/py 3/bin/python' -P -c {shlex.quote(fab_guard.LAUNCH)} \"$@\"" in path.read_text()
    env = fab_guard.guard_env({"PATH": "/usr/bin"}, path.parent, ["b" * 64, "a" * 64], "h1")
    assert env["PATH"].split(os.pathsep)[0] == str(path.parent)
    assert fab_guard.approved_from_env(env) == {"a" * 64, "b" * 64}
    assert fab_guard.approved_from_env({}) == frozenset()  # no list: every FAB is refused


def test_flower_facts_the_guard_relies_on() -> None:
    """Tripwires for a Flower upgrade: the SuperExec starts ClientApps by the bare name ``flwr-clientapp``; the
    ClientApp process installs the FAB (``install_from_fab``) and resolves its folder (``get_project_dir``) through
    module globals of run_clientapp, before it loads the ClientApp; a FAB hash is SHA-256 of the .fab bytes."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supernode.runtime import run_clientapp as runtime

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == fab_guard.CLIENTAPP_COMMAND
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in inspect.getsource(subprocess_executor.SubprocessExecutor.launch)
    body = inspect.getsource(runtime.run_clientapp)
    steps = [body.index(s) for s in ("pull_task_input(", "install_from_fab(", "get_project_dir(", "client_app(")]
    assert steps == sorted(steps), steps
    assert "hashlib.sha256(fab_bytes).hexdigest()" in inspect.getsource(importlib.import_module("flwr.cli.run.run"))


# ---------------------------------------------------------------------------- loopback deployment
SITES = DEPLOY_SITES
UNPINNED = "hospital_c"
OVERRIDES = [*DEPLOY_OVERRIDES, "data.synthetic.studies_per_site=16"]


def _flwr(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    from mlip_fed.deploy.flower_env import flower_executable

    return subprocess.run(
        [flower_executable("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )


def _json(out: str) -> dict:
    return json.loads(out[out.index("{") :])


@pytest.mark.integration
def test_outsider_is_refused_and_an_unpinned_fab_never_runs(tmp_path: Path) -> None:
    from mlip_fed.deploy.certs import CA_CERT, write_site_keys
    from mlip_fed.deploy.superlink import connection_toml
    from mlip_fed.federation.simulation import write_run_config

    overrides = [*OVERRIDES, f"data.root={tmp_path / 'synth'}"]
    out = tmp_path / "out"
    marker = tmp_path / "rogue_marker"
    with loopback_deployment(tmp_path, overrides, app_dir=ROOT) as (dep, manifests):
        fab_hash = dep.fab_hash()  # `mlip-certs fab-hash .`, what the operator hands the hospitals
        other = fab_guard.fab_sha256(b"an older release of the app")
        for site_id, manifest in zip(SITES, manifests, strict=True):
            pinned = [other] if site_id == UNPINNED else None
            dep.start_site(site_id, dep.site_yaml(site_id, manifest, approved_fab_hashes=pinned))

        # An outsider: the public CA certificate, a key pair of its own, the sites' address (the gateway).
        write_site_keys(dep.certs, "rogue")
        outsider = {**dep.env, "FLWR_HOME": str(tmp_path / "outsider_home")}
        Path(outsider["FLWR_HOME"]).mkdir()
        (Path(outsider["FLWR_HOME"]) / "config.toml").write_text(
            '[superlink]\ndefault = "target"\n\n' + connection_toml("target", dep.address, dep.certs / CA_CERT)
        )
        register = _flwr(
            ["supernode", "register", str(dep.certs / "sites" / "rogue.pub"), "target"], outsider, tmp_path
        )
        assert register.returncode != 0 and "registered successfully" not in register.stdout, register.stdout
        app = rogue_app(tmp_path, marker)
        rogue_run = _flwr(["run", str(app), "target"], outsider, app)
        assert rogue_run.returncode != 0 and "Successfully started run" not in rogue_run.stdout, rogue_run.stdout
        listed = _flwr(["supernode", "list", "target"], outsider, tmp_path)
        assert listed.returncode != 0, listed.stdout
        import httpx

        with httpx.Client(verify=str(dep.certs / CA_CERT), timeout=30) as client:  # the ServerApp's task API
            assert client.post(f"https://{dep.address}/v1/runtime/acquire-task", content=b"").status_code == 403
            assert client.get(f"https://{dep.address}/health").status_code == 200
        gateway_log = dep.log_tail("superlink", chars=10**7)
        for route in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/acquire-task"):
            assert f"refused POST {route} from 127.0.0.1" in gateway_log, route

        # The operator, on the control address: three nodes (no rogue one), no run yet.
        nodes = _json(_flwr(["supernode", "list", "deploy", "--format", "json"], dep.env, tmp_path).stdout)["nodes"]
        assert len(nodes) == len(SITES), nodes
        assert _json(_flwr(["ls", "deploy", "--format", "json"], dep.env, tmp_path).stdout)["runs"] == []

        run = dep.flwr_run(ROOT, write_run_config(tmp_path / "run_config.toml", "smoke", overrides, out, 1))
        run.wait(timeout=600)
        summary = json.loads((out / "results.json").read_text())
        assert summary["status"] == "completed" and summary["aggregated_rounds"] == 1, dep.log_tail("flwr_run")
        (round_1,) = [r for r in summary["rounds"] if r["round"] == 1]
        assert sorted(s["site_id"] for s in round_1["sites"]) == ["hospital_a", "hospital_b"], round_1
        (refused,) = summary["failures"]
        assert refused["round"] == 1 and f"refused FAB sha256={fab_hash}" in refused["reason"], refused
        assert f"mlip-client: {UNPINNED}: refused FAB sha256={fab_hash}" in dep.log_tail(UNPINNED, chars=10**6)
        for site_id in SITES:
            log = dep.log_tail(site_id, chars=10**6)
            approved = f"mlip-client: {site_id}: FAB sha256={fab_hash} approved" in log
            assert approved == (site_id != UNPINNED), (site_id, log[-3000:])
            trained = (dep.root / "sites" / "state" / site_id / "bank_history.jsonl").is_file()
            assert trained == (site_id != UNPINNED), site_id
        assert not marker.exists()


if __name__ == "__main__":  # a readable trace when debugging: python tests/test_deploy_security.py
    sys.exit(pytest.main([__file__, "-x", "-s", *shlex.split(os.environ.get("PYTEST_ARGS", ""))]))
