"""The Flower-free round logic: aggregation, failures, checkpoint/resume, results.json, exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import D, site_update

from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.coordinator import FederationCoordinator, FederationFailed
from mlip_fed.federation.payload import SiteFailure, SiteUpdate
from mlip_fed.federation.server_state import checkpoint_path, load_server_state
from mlip_fed.model.objectives.prototype_bank import PrototypeBank


def _cfg(**federation: object) -> ExperimentConfig:
    cfg = ExperimentConfig()
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update=federation)})


def _update(site: str, value: float, n: int, count0: float = 10.0) -> SiteUpdate:
    metrics = {"train_loss": value, "train_seconds": 1.0, "handler_seconds": 2.0}
    return site_update(site, value, n, count0=count0, sum_at=(0, 0), metrics=metrics)


def _coordinator(tmp_path: Path, log: list[str] | None = None, **federation: object) -> FederationCoordinator:
    lines = log if log is not None else []
    return FederationCoordinator(
        _cfg(**federation),
        tmp_path / "run",
        initial_weights={"w": torch.zeros(2)},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=lambda weights, bank: {"auroc": float(weights["w"].mean()), "r_at_5": 0.5},
        log=lines.append,
    )


def test_round_aggregates_logs_failures_and_checkpoints(tmp_path: Path) -> None:
    log: list[str] = []
    coord = _coordinator(tmp_path, log, num_rounds=2, bank_min_count=5)
    coord.start()
    assert list(coord.remaining_rounds()) == [1, 2]
    failure = SiteFailure(1, "site_2", 7, "error reply: [site=site_2] RuntimeError: boom")
    record = coord.complete_round(
        1, [_update("site_0", 1.0, 1), _update("site_1", 5.0, 3)], [failure], num_sampled=3, communication_seconds=4.0
    )
    assert torch.allclose(coord.state.weights["w"], torch.full((2,), 4.0))
    assert record["train_loss"] == pytest.approx(4.0)
    assert record["eval"]["auroc"] == pytest.approx(4.0)
    assert record["bank_updated"] == 1
    assert record["failures"][0]["site_id"] == "site_2"
    assert record["seconds"]["flower_overhead"] == pytest.approx(2.0)
    assert record["bytes"]["up_weights_per_site"] == [8, 8]
    assert any("site site_2 (node 7) left out" in line for line in log)

    saved = load_server_state(tmp_path / "run")
    assert saved is not None and saved.completed_round == 1
    assert torch.allclose(saved.weights["w"], torch.full((2,), 4.0))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "running" and results["completed_rounds"] == 1
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert results["baseline_eval"]["auroc"] == 0.0


def test_resume_continues_after_last_completed_round(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, num_rounds=3)
    coord.start()
    coord.complete_round(1, [_update("site_0", 2.0, 1)], [], num_sampled=1)
    # A second server process on the same output dir refuses to overwrite unless asked to resume ...
    with pytest.raises(ValueError, match="resume=true"):
        _coordinator(tmp_path, num_rounds=3)
    # ... and with resume=true it carries on from round 2 with the saved weights and history.
    resumed = _coordinator(tmp_path, num_rounds=3, resume=True)
    assert list(resumed.remaining_rounds()) == [2, 3]
    assert torch.allclose(resumed.state.weights["w"], torch.full((2,), 2.0))
    resumed.start()  # does not re-evaluate round 0
    for r in (2, 3):
        resumed.complete_round(r, [_update("site_0", 2.0 + r, 1)], [], num_sampled=1)
    summary = resumed.finish()
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "results.png").stat().st_size > 0


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, num_rounds=2)
    coord.complete_round(1, [_update("site_0", 1.0, 1)], [], num_sampled=1)
    cfg = _cfg(num_rounds=2, resume=True)
    cfg = cfg.model_copy(update={"seed": 99})
    with pytest.raises(ValueError, match="seed was 0"):
        FederationCoordinator(
            cfg,
            tmp_path / "run",
            initial_weights={"w": torch.zeros(2)},
            initial_bank=PrototypeBank(dim=D).state_dict(),
        )


def test_run_without_any_aggregated_round_fails_visibly(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, num_rounds=1)
    coord.start()
    record = coord.complete_round(
        1, [], [SiteFailure(1, "site_0", 3, "no reply before the round timeout")], num_sampled=1
    )
    assert record["aggregated"] is False
    assert torch.equal(coord.state.weights["w"], torch.zeros(2))
    with pytest.raises(FederationFailed, match="no round aggregated"):
        coord.finish()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["failures"] == [
        {"round": 1, "site_id": "site_0", "node_id": 3, "reason": "no reply before the round timeout"}
    ]


def test_node_selection_is_seeded_and_respects_minimum(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, fraction_train=0.3, min_train_nodes=2)
    nodes = list(range(100, 110))
    first = coord.select_nodes(nodes, 1)
    assert len(first) == 3 and first == coord.select_nodes(list(reversed(nodes)), 1)
    assert coord.select_nodes(nodes[:2], 1) == nodes[:2]
    assert checkpoint_path(tmp_path).name == "server_last.pt"


def test_output_dir_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        FederationCoordinator(
            _cfg(), Path("relative/run"), initial_weights={}, initial_bank=PrototypeBank(dim=D).state_dict()
        )
