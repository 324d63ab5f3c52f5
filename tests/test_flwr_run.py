"""End-to-end ``flwr run`` on a private local SuperLink (own FLWR_HOME, free ports, Ray on 127.0.0.1).

Asserts on results.json, never on flwr's exit code (it is 0 even for failed runs), and checks the
SuperLink it started is gone afterwards. Sizes are tiny: these test plumbing, not learning.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from mlip_fed.federation.simulation import run_flwr_simulation, stop_superlink, superlink_pids

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
        assert 0.0 <= record["eval"]["r_at_5"] <= 1.0
        assert record["train_loss"] > 0
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    for k in range(3):  # site state lives on the site's disk
        site_dir = tmp_path / "run" / "sites" / f"site_{k}"
        assert (site_dir / "trainer_round_0002.pt").is_file()
        assert len((site_dir / "bank_history.jsonl").read_text().splitlines()) == 2
    assert "round   sites     loss" in result.log_path.read_text()  # the progress table reached the stream


def test_kill_after_round_one_then_resume(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    flwr_home = tmp_path / "flwr_home"
    overrides = _overrides(tmp_path / "data", 2)
    results_file = output_dir / "results.json"

    def kill_after_round_one() -> None:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            if results_file.is_file() and '"completed_rounds": 1' in results_file.read_text():
                stop_superlink(flwr_home)  # the ServerApp and Ray die with it, mid round 2
                return
            time.sleep(0.1)

    num_rounds = 4  # the kill lands after round 1 or, on a slow machine, a round later: room either way
    watcher = threading.Thread(target=kill_after_round_one, daemon=True)
    watcher.start()
    first = run_flwr_simulation(
        REPO,
        output_dir=output_dir,
        num_supernodes=2,
        experiment="smoke",
        overrides=overrides,
        num_rounds=num_rounds,
        timeout_s=400,
        flwr_home=flwr_home,
    )
    watcher.join(timeout=5)
    assert not first.ok and first.results is not None
    done = first.results["completed_rounds"]
    assert first.results["status"] == "running" and 1 <= done < num_rounds

    # Site 1's local trainer checkpoint of the last completed round is now corrupt: it raises in the
    # next round and is left out of that round only.
    (output_dir / "sites" / "site_1" / f"trainer_round_{done:04d}.pt").write_bytes(b"not a checkpoint")
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
    expected_updates = [2] * num_rounds
    expected_updates[done] = 1  # round done + 1: site_1 failed
    assert [r["num_updates"] for r in res["rounds"][1:]] == expected_updates
    assert [(f["round"], f["site_id"]) for f in res["failures"]] == [(done + 1, "site_1")]
    assert "cannot read checkpoint" in res["failures"][0]["reason"]
    checkpoint = torch.load(output_dir / "checkpoints" / "server_last.pt", weights_only=False)
    assert checkpoint["completed_round"] == num_rounds
