"""Loopback deployment, one run covering issue #5 §5: a TLS SuperLink with node authentication behind its Fleet
gateway (``mlip-superlink``), three hospitals started through ``mlip-client`` pinning the
app's FAB hash, ``flwr run`` of the ``smoke`` experiment for 2 rounds; an
unregistered fourth node is refused; one hospital is SIGKILLed mid-round 1 (launcher, SuperNode,
SuperExec and ClientApp, by PID), round 1 completes with the two survivors once the SuperLink marks the
dead node unavailable, the hospital is restarted through ``mlip-client`` and takes part in round 2. The server holds
no data (its ``data.root`` does not exist): every round's AUROC comes from the hospitals' own test splits
(``@app.evaluate``), in the progress output, results.json and TensorBoard.

Everything binds 127.0.0.1 on free ports; every process started here is stopped by PID
(``LocalDeployment.stop``). Cost: the SuperLink notices a dead node only after two missed heartbeats
(Flower's fixed 30 s interval), so the kill adds up to a minute to the run.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from conftest import DEPLOY_OVERRIDES, DEPLOY_SITES, loopback_deployment

from mlip_fed.deploy.local import LocalDeployment
from mlip_fed.federation.simulation import write_run_config
from mlip_fed.process_tree import alive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SITES = DEPLOY_SITES
KILLED = "hospital_c"
OVERRIDES = [
    *DEPLOY_OVERRIDES,
    "data.synthetic.studies_per_site=40",  # ~7 test studies a site: enough for a probe AUROC at each hospital
    "eval.linear_probe.min_count=3",
]


def _wait_for(what: str, check, timeout_s: float, dep: LocalDeployment, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        run = dep.procs.get("flwr_run")
        if run is not None and run.poll() is not None:
            break
        time.sleep(poll_s)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s; flwr run:\n{dep.log_tail('flwr_run')}")


def _completed_rounds(results: Path) -> int:
    try:
        return int(json.loads(results.read_text())["completed_rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def test_loopback_deployment_tls_node_auth_and_dropout(tmp_path: Path) -> None:
    data_root = tmp_path / "synth"
    overrides = [*OVERRIDES, f"data.root={data_root}"]
    out = tmp_path / "out"
    with loopback_deployment(tmp_path, overrides) as (dep, manifests):
        from mlip_fed.deploy.certs import write_site_keys

        write_site_keys(dep.certs, "rogue")  # a valid key pair the SuperLink never registered
        yamls = {s: dep.site_yaml(s, m) for s, m in zip(SITES, manifests, strict=True)}
        for site_id in SITES:
            dep.start_site(site_id, yamls[site_id])
        # The unregistered node tries while the federation runs; the launcher gives up after its retries.
        rogue_cmd = [sys.executable, "-m", "mlip_fed.cli.client", "--site-config"]
        rogue = dep.popen("rogue", [*rogue_cmd, str(dep.site_yaml("rogue", manifests[0], max_retries=1))])
        dep.procs["rogue"] = rogue

        no_data = tmp_path / "server_holds_no_data"
        server_overrides = [*OVERRIDES, f"data.root={no_data}", "train.tensorboard=true"]
        run_config = write_run_config(tmp_path / "run_config.toml", "smoke", server_overrides, out, 2)
        run = dep.flwr_run(ROOT, run_config)

        # Mid-round 1: the killed site's ClientApp has pulled its message and is training. Round 0 is the sites'
        # evaluation of the initial model, each in a ClientApp of its own: wait until it is recorded, and skip the
        # evaluation's ClientApp if it is still exiting.
        results = out / "results.json"
        evaluation_apps: set[int] = set()

        def round_zero_recorded() -> bool:
            evaluation_apps.update(dep.clientapp_pids(KILLED))
            return results.is_file()

        _wait_for("round 0 (the sites' evaluation of the initial model)", round_zero_recorded, 300, dep)
        _wait_for(f"{KILLED}'s round-1 ClientApp", lambda: set(dep.clientapp_pids(KILLED)) - evaluation_apps, 300, dep)
        killed = dep.kill_site(KILLED)
        # SIGKILL is asynchronous: a process with a large address space takes a moment to tear down.
        _wait_for(
            f"{KILLED}'s processes to die",
            lambda: not any(alive(pid) for pid in killed),
            30,
            dep,
            poll_s=0.2,
        )
        assert killed

        _wait_for("round 1 without the killed site", lambda: _completed_rounds(results) >= 1, 300, dep, poll_s=1.0)
        dep.start_site(KILLED, yamls[KILLED])  # the hospital's service manager restarts it

        run.wait(timeout=600)
        summary = json.loads(results.read_text())
        assert summary["status"] == "completed", dep.log_tail("flwr_run")
        assert summary["aggregated_rounds"] == 2, summary
        took_part = {r["round"]: sorted(s["site_id"] for s in r["sites"]) for r in summary["rounds"] if r["round"]}
        assert took_part == {1: ["hospital_a", "hospital_b"], 2: list(SITES)}, took_part
        (dropped,) = summary["failures"]
        assert dropped["round"] == 1 and "Node Unavailable" in dropped["reason"], dropped
        _assert_evaluated_at_the_sites(summary, out, dep.log_tail("flwr_run", 1_000_000))
        assert not no_data.exists()  # the server never looked for data of its own
        for site_id in SITES:  # each hospital trained under its own id, in its own state dir
            assert (dep.root / "sites" / "state" / site_id / "bank_history.jsonl").is_file(), site_id
        for site_id in SITES:
            proc = dep.procs[site_id]
            assert proc.poll() is None, f"{site_id} exited early:\n{dep.log_tail(site_id)}"

        rogue.wait(timeout=180)
        rogue_log = dep.log_tail("rogue")
        assert rogue.returncode != 0, rogue_log
        assert "mlip-client: rogue:" in rogue_log and "registered" in rogue_log, rogue_log


def _assert_evaluated_at_the_sites(summary: dict, out: Path, server_log: str) -> None:
    """Round 0, 1 and 2 scored by the hospitals on their own splits; the server evaluated nothing itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds = {r["round"]: r for r in summary["rounds"]}
    for rnd in (0, 1, 2):
        assert "eval" not in rounds[rnd], rounds[rnd]
        site_eval = rounds[rnd]["site_eval"]
        evaluated = {s["site_id"] for s in site_eval["sites"]}
        assert {"hospital_a", "hospital_b"} <= evaluated <= set(SITES), site_eval
        assert 0.0 <= site_eval["metrics"]["auroc"] <= 1.0, site_eval
        assert site_eval["num_examples"] == sum(s["num_examples"] for s in site_eval["sites"]) > 0
    assert len(rounds[2]["site_eval"]["sites"]) == 3  # the restarted hospital evaluates again
    assert summary["final_site_eval"]["auroc"] == rounds[2]["site_eval"]["metrics"]["auroc"]
    assert "[server] round 2 evaluated at 3 site(s)" in server_log and "AUROC 0." in server_log, server_log
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("site_eval/auroc")] == [0, 1, 2]
    assert [e.step for e in events.Scalars("site_eval/hospital_a/auroc")] == [0, 1, 2]


if __name__ == "__main__":  # a readable trace when debugging: python tests/test_deploy_loopback.py
    sys.exit(pytest.main([__file__, "-x", "-s", *shlex.split(os.environ.get("PYTEST_ARGS", ""))]))
