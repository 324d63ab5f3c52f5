"""End-to-end ``flwr run`` on a private local SuperLink (own FLWR_HOME, free ports, Ray on 127.0.0.1).

Asserts on results.json, never on flwr's exit code (it is 0 even for failed runs), and checks the
SuperLink it started is gone afterwards. Sizes are tiny: these test plumbing, not learning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlip_fed.federation import venv_defaults
from mlip_fed.federation.coordinator import RUN_ID_FILE
from mlip_fed.federation.simulation import free_port, run_flwr_simulation, write_run_config
from mlip_fed.federation.site import PRIVACY_LEDGER
from mlip_fed.federation.superlink_tree import stop_superlink, superlink_pids
from mlip_fed.privacy.ledger import PrivacyLedger
from mlip_fed.process_tree import alive, descendants

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _overrides(data_root: Path, num_sites: int) -> list[str]:
    return [
        f"data.root={data_root}",
        f"data.synthetic.num_sites={num_sites}",
        "data.synthetic.studies_per_site=40",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.log_every=1",
        f"federation.min_available_nodes={num_sites}",
        f"federation.min_train_nodes={num_sites}",
    ]


def test_three_sites_two_rounds(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr_home"
    result = run_flwr_simulation(
        REPO,
        output_dir=tmp_path / "run",
        num_supernodes=3,
        experiment="smoke",
        # bf16 on the wire both ways: the ServerApp/ClientApp wiring of federation.transport_dtype runs end to end
        overrides=[*_overrides(tmp_path / "data", 3), "federation.transport_dtype=bfloat16"],
        num_rounds=2,
        timeout_s=400,
        flwr_home=flwr_home,
    )
    assert superlink_pids(flwr_home) == []  # the SuperLink we started is stopped
    assert result.ok, result.failure_reason()
    res = result.results
    assert res is not None
    assert res["completed_rounds"] == 2 and res["aggregated_rounds"] == 2 and res["failures"] == []
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["num_updates"] == 3
        assert sorted(s["site_id"] for s in record["sites"]) == ["site_0", "site_1", "site_2"]
        assert record["bytes"]["down_weights_per_site"] > 0 and len(record["bytes"]["up_bank_per_site"]) == 3
        assert record["train_loss"] > 0
    for record in rounds:  # evaluation where the data is (the default): every site scores round 0, 1 and 2
        assert "eval" not in record  # the server evaluates nothing of its own by default
        site_eval = record["site_eval"]
        assert sorted(s["site_id"] for s in site_eval["sites"]) == ["site_0", "site_1", "site_2"]
        assert site_eval["failures"] == [] and site_eval["num_examples"] == site_eval["metrics"]["n_test"] > 0
        assert 0.0 <= site_eval["metrics"]["r_at_5"] <= 1.0
    assert res["baseline_site_eval"] is not None and res["final_site_eval"] is not None
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    for k in range(3):  # site state lives on the site's disk
        site_dir = tmp_path / "run" / "sites" / f"site_{k}"
        assert (site_dir / "trainer_round_0002.pt").is_file()
        assert len((site_dir / "bank_history.jsonl").read_text().splitlines()) == 2
    log = result.log_path.read_text()
    assert "round   sites     loss" in log  # the progress table reached the stream
    assert "[server] round 2 evaluated at 3 site(s)" in log
    for k in range(3):  # each site's own round summary and evaluation reach the run's stream, under its id
        assert f"[site_{k}] round 2: " in log and f"[site_{k}] round 2: evaluated on" in log
    assert " examples, 2 steps, loss " in log


def test_ctrl_c_after_round_one_then_resume(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to mlip-simulate's process group) after round 1 under site DP: mlip-simulate exits 130 with
    the resume command, every process it started (flwr run, the detached SuperLink, SuperExec, the simulation, Ray,
    the watchdog) is gone; federation.resume=true then runs to the last round, and every site's privacy ledger holds
    one event per (round, kind), all under the run's one id (a round interrupted mid-way is not charged twice)."""
    output_dir = tmp_path / "run"
    overrides = [*_overrides(tmp_path / "data", 2), "privacy=bucketed"]
    results_file = output_dir / "results.json"
    num_rounds = 6  # the interrupt lands after round 1 or, on a loaded machine, rounds later: room either way
    cmd = [str(Path(sys.executable).parent / "mlip-simulate"), "--sites", "2", "--rounds", str(num_rounds)]
    cmd += ["--out", str(output_dir), "--timeout", "400", "experiment=smoke", *overrides]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:  # files, not pipes: nobody reads while it runs
        # Its own process group, as a terminal's foreground job: SIGINT to the group is what Ctrl-C sends.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if results_file.is_file() and '"completed_rounds": 1' in results_file.read_text():
                started = descendants(proc.pid)  # flwr run, SuperLink, SuperExec, simulation, Ray, watchdog
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.1)
        proc.wait(timeout=120)  # a generous bound: it must exit, how fast is not tested
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert started, f"round 1 never completed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert proc.returncode == 130, stderr[-3000:]
    assert "federation.resume=true" in stderr and "interrupted after round" in stderr, stderr[-3000:]
    deadline = time.monotonic() + 30  # SIGKILLed children are reaped by init a moment later
    while time.monotonic() < deadline and any(alive(pid) for pid in started):
        time.sleep(0.2)
    assert [pid for pid in started if alive(pid)] == []
    first = json.loads(results_file.read_text())
    done = first["completed_rounds"]
    assert first["status"] == "running" and 1 <= done < num_rounds - 1

    # Site 1's local trainer checkpoints from the last completed round on are now corrupt: the next round that
    # site_1 computes (not one whose stored reply it sends again) raises, and it is left out of that round only.
    for checkpoint in (output_dir / "sites" / "site_1").glob("trainer_round_*.pt"):
        if int(checkpoint.stem.rsplit("_", 1)[1]) >= done:
            checkpoint.write_bytes(b"not a checkpoint")
    second = run_flwr_simulation(
        REPO,
        output_dir=output_dir,
        num_supernodes=2,
        experiment="smoke",
        overrides=[*overrides, "federation.resume=true"],
        num_rounds=num_rounds,
        timeout_s=400,
        flwr_home=tmp_path / "home2",
    )
    assert second.ok, second.failure_reason()
    res = second.results
    assert res is not None and res["completed_rounds"] == num_rounds
    assert [r["round"] for r in res["rounds"]] == list(range(num_rounds + 1))  # completed rounds kept, not redone
    [failure] = res["failures"]
    failed_round = failure["round"]
    assert failure["site_id"] == "site_1" and failed_round in (done + 1, done + 2)
    assert "failed under DP" in failure["reason"]  # a DP site sends only a public code, never the message
    expected_updates = [2] * num_rounds
    expected_updates[failed_round - 1] = 1
    assert [r["num_updates"] for r in res["rounds"][1:]] == expected_updates
    checkpoint = torch.load(output_dir / "checkpoints" / "server_last.pt", weights_only=False)
    assert checkpoint["completed_round"] == num_rounds

    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    for site_id in ("site_0", "site_1"):
        with PrivacyLedger(output_dir / "sites" / site_id / PRIVACY_LEDGER) as ledger:
            events = ledger.events()
        keys = [(e.round, e.kind) for e in events]
        assert len(keys) == len(set(keys)), f"{site_id}: an event recorded twice: {sorted(keys)}"
        assert {e.run_id for e in events} == {run_id}
        trained = {e.round for e in events if e.kind == "train"}
        skipped = {failed_round} if site_id == "site_1" else set()
        assert trained == set(range(1, num_rounds + 1)) - skipped, f"{site_id}: {sorted(keys)}"


def test_plain_flwr_run_installs_nothing(tmp_path: Path) -> None:
    """`.venv/bin/flwr run .` as a researcher types it: no FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION in the
    environment and the venv's bin not on PATH. The venv's defaults (venv_defaults, written by `make venv`)
    must keep Flower from creating a per-run uv environment; the run must complete; the local SuperLink
    that `flwr run` leaves behind is stopped here by PID."""
    assert venv_defaults.is_installed(), (
        f"{venv_defaults.pth_path()} is missing or outdated: run `make venv` "
        "(or `python -m mlip_fed.federation.venv_defaults`)"
    )
    flwr_home = (tmp_path / "flwr_home").resolve()
    output_dir = (tmp_path / "run").resolve()
    http_port, control_port = free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    flwr_home.mkdir()
    overrides = [*_overrides(tmp_path / "data", 2), "train.num_threads=1"]
    run_config = write_run_config(tmp_path / "run.toml", "smoke", overrides, output_dir, 1)
    cmd = [f"{bin_dir}/flwr", "run", ".", "--stream", "--run-config", str(run_config)]
    cmd += ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        left_running = superlink_pids(flwr_home)
    finally:
        stopped = stop_superlink(flwr_home)
    log = proc.stdout + proc.stderr
    assert superlink_pids(flwr_home) == [] and stopped  # flwr left it running; we stopped it by PID
    assert left_running, "expected `flwr run` to leave its local SuperLink running (Flower 1.42 behaviour)"
    assert proc.returncode == 0, log[-3000:]
    assert not (flwr_home / "runtime-envs").exists(), "Flower created a per-run runtime environment"
    assert "uv sync" not in log and "Installing application dependencies" not in log, log[-3000:]
    results = json.loads((output_dir / "results.json").read_text())  # flwr run exits 0 even for failed runs
    assert results["status"] == "completed" and results["aggregated_rounds"] == 1, log[-3000:]
    assert results["failures"] == []
