"""End-to-end SecAgg+ on a private local SuperLink: 3 SynthCXR sites, 2 rounds, Flower's legacy SecAgg+ workflow.

Checks what only a real run shows: Flower's masking, the legacy FitIns/FitRes path through our one ClientApp, the
0-d array corruption (no weight jumps), and that nothing per-site beyond timings reaches results.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.simulation import run_flwr_simulation
from mlip_fed.federation.site import initial_global_state
from mlip_fed.federation.superlink_tree import superlink_pids

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_three_sites_two_secure_rounds(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr_home"
    output_dir = tmp_path / "run"
    result = run_flwr_simulation(
        REPO,
        output_dir=output_dir,
        num_supernodes=3,
        experiment="smoke",
        overrides=[
            f"data.root={tmp_path / 'data'}",
            "data.synthetic.num_sites=3",
            "data.synthetic.studies_per_site=16",
            "train.batch_size=8",
            "train.max_steps=2",
            "federation.secure_aggregation=true",
            "federation.min_available_nodes=3",
            "federation.min_train_nodes=3",
            "federation.secagg_max_examples=64",
        ],
        num_rounds=2,
        timeout_s=300,
        flwr_home=flwr_home,
    )
    assert superlink_pids(flwr_home) == []
    assert result.ok, result.failure_reason()
    res = result.results
    assert res is not None
    assert res["completed_rounds"] == 2 and res["aggregated_rounds"] == 2 and res["failures"] == []
    final = torch.load(output_dir / "checkpoints" / "server_last.pt", weights_only=False)
    for record in res["rounds"][1:]:
        assert record["secure_aggregation"] is True and record["num_updates"] == 3
        assert sorted(s["site_id"] for s in record["sites"]) == ["site_0", "site_1", "site_2"]
        for site in record["sites"]:  # timings only: no per-site example count or loss left the sites in the clear
            assert set(site) <= {"site_id", "train_seconds", "handler_seconds", "train_steps"}
        assert 0 < record["total_examples"] <= 3 * 64
        assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
        # the sites' own evaluation runs beside the legacy SecAgg+ workflow (plain ``evaluate`` messages)
        site_eval = record["site_eval"]
        assert site_eval["num_sites"] == 3 and site_eval["failures"] == []
        assert 0.0 <= site_eval["metrics"]["r_at_5"] <= 1.0
    weights = final["weights"]
    start, _, _ = initial_global_state(ExperimentConfig.model_validate(res["config"]))
    assert any(not torch.equal(weights[k], start[k]) for k in start), "two secure rounds left the weights unchanged"
    # No learnable logit scale in this model; the 0-d SecAgg+ corruption (2.66 -> 16.6 in one round) would show as a
    # jump in any small tensor. Two rounds of 2 local steps move no weight by anywhere near 1.
    drift = {k: float((weights[k].float() - start[k].float()).abs().max()) for k in start}
    assert max(drift.values()) < 1.0, sorted(drift.items(), key=lambda kv: -kv[1])[:3]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert int(res["rounds"][-1]["bank_updated"]) >= 0
