"""DP in the federation: a site's round under its own policy, its ledger, its refusals and what it releases.

In-process (no Flower, no Ray): ``SiteRuntime.train_round`` on the smoke experiment with tiny data, and
the coordinator fed the site's real update and a real refusal.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import dp_site_config, round_request

from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.coordinator import FederationCoordinator
from mlip_fed.federation.payload import RoundRequest, SiteFailure, SiteUpdate, format_site_error
from mlip_fed.federation.site import (
    CALIBRATION_META,
    PRIVACY_LEDGER,
    RoundRefused,
    SiteRuntime,
    accumulate_bank,
    initial_global_state,
    privacy_overrides,
)
from mlip_fed.privacy.ledger import PrivacyLedger

RUN_ID = "test-run"


def _cfg(*overrides: str) -> ExperimentConfig:
    # a loose release so the test sees both kept and suppressed categories
    return dp_site_config("privacy.prototype_count_threshold=3", *overrides)


def _request(cfg: ExperimentConfig, server_round: int = 1, **config: object) -> RoundRequest:
    return round_request(cfg, server_round, RUN_ID, num_rounds=2, **config)


def _events(state_dir: Path) -> list:
    with PrivacyLedger(state_dir / PRIVACY_LEDGER) as ledger:
        return ledger.events()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteRuntime, RoundRequest, SiteUpdate, list[str]]:
    """One DP round of site_0, shared by the tests that only read its results."""
    torch.set_num_threads(1)
    cfg = _cfg()
    lines: list[str] = []
    site = SiteRuntime(cfg, 0, tmp_path_factory.mktemp("site") / "site_0", log=lines.append)
    request = _request(cfg, **{"noise-multiplier": 0.01, "privacy.epsilon_budget": 1000.0, "clipping-norm": 50.0})
    update = site.train_round(request)
    return site, request, update, lines


def test_dp_round_trains_and_charges_the_ledger(trained) -> None:
    site, request, update, _ = trained
    events = _events(site.state_dir)
    assert [(e.run_id, e.round, e.kind) for e in events] == [
        (RUN_ID, 1, "train"),
        (RUN_ID, 1, "prototype_release"),
    ]
    train = events[0]
    assert train.steps == update.metrics["train_steps"] > 0
    assert train.sample_rate == pytest.approx(site.sample_rate)
    assert train.effective_noise_multiplier == pytest.approx(train.noise_multiplier / 2)  # bucketed: sigma / 2
    assert any(not torch.equal(update.weights[k], request.weights[k]) for k in request.weights)
    # only accounted values leave: no training loss, no realised sample count; epsilon is reported
    assert not any(k == "train_loss" or k.startswith("loss_") or k == "train_samples" for k in update.metrics)
    assert 0 < update.metrics["epsilon"] <= 60
    assert update.num_examples == max(1, round(site.sample_rate * site.num_train * train.steps))


def test_sigma_is_calibrated_once_and_request_cannot_override_privacy(trained) -> None:
    site, _, _, lines = trained
    with PrivacyLedger(site.state_dir / PRIVACY_LEDGER) as ledger:
        calibration = ledger.meta()[CALIBRATION_META]
        events = ledger.events()
    assert list(calibration) == [RUN_ID]
    sigma = calibration[RUN_ID]["noise_multiplier"]
    assert sigma > 0.01  # the request's noise-multiplier=0.01 was not used
    assert events[0].noise_multiplier == pytest.approx(sigma)
    assert events[0].details["clipping_norm"] == 1.0  # the request's clipping-norm=50 was not used
    assert any("ignoring privacy settings" in line and "noise-multiplier" in line for line in lines)
    assert privacy_overrides({"local-epochs": 1, "run-id": "x", "delta": 0.1, "privacy.mechanism": "none"}) == [
        "delta",
        "privacy.mechanism",
    ]


def test_released_bank_is_noised_and_thresholded_on_noisy_counts(trained) -> None:
    site, _, update, _ = trained
    raw, contributions = accumulate_bank(site.model, site.stats_loader, torch.device("cpu"))
    assert 0 < contributions <= site.cfg.privacy.prototype_contribution_bound
    released = update.bank_stats
    kept = released["count"] != 0
    assert kept.any() and (~kept).any(), released["count"]
    threshold = site.cfg.privacy.prototype_count_threshold
    assert (released["count"][kept] >= threshold).all()
    assert not torch.allclose(released["count"][kept], raw.count[kept])  # noise on the counts
    assert not torch.allclose(released["sum_image"][kept], raw.sum_image[kept])  # and on the sums
    assert released["sum_image"][~kept].abs().sum() == 0 and released["sum_text"][~kept].abs().sum() == 0


def test_retried_round_is_not_charged_twice(trained) -> None:
    site, request, update, _ = trained
    before = _events(site.state_dir)
    again = site.train_round(request)  # the same (run id, round), e.g. a reply lost in transit
    after = _events(site.state_dir)
    assert [(e.kind, e.steps) for e in after] == [(e.kind, e.steps) for e in before]
    assert again.metrics["epsilon"] == pytest.approx(update.metrics["epsilon"])


def test_budget_exceeding_round_is_refused_and_nothing_trained(tmp_path: Path) -> None:
    cfg = _cfg("privacy.epsilon_budget=0.5", "privacy.noise_multiplier=0.5")
    site = SiteRuntime(cfg, 0, tmp_path / "site_0", log=lambda line: None)
    request = _request(cfg)
    before = {k: v.clone() for k, v in site.model.state_dict().items()}
    with pytest.raises(RoundRefused, match=r"refused \(budget\).*epsilon_budget=0.5"):
        site.train_round(request)
    assert _events(site.state_dir) == []
    assert not list(site.state_dir.glob("trainer_round_*.pt"))
    assert all(torch.equal(v, before[k]) for k, v in site.model.state_dict().items())


def test_delta_above_one_over_n_is_refused(tmp_path: Path) -> None:
    cfg = _cfg("privacy.delta=0.5", "privacy.noise_multiplier=2.0")
    site = SiteRuntime(cfg, 0, tmp_path / "site_0", log=lambda line: None)
    with pytest.raises(RoundRefused, match=r"refused \(delta\)"):
        site.train_round(_request(cfg))


def test_coordinator_logs_a_refusal_and_aggregates_the_others(trained, tmp_path: Path) -> None:
    site, _, update, _ = trained
    _, bank, _ = initial_global_state(site.cfg)
    lines: list[str] = []
    coordinator = FederationCoordinator(
        site.cfg,
        tmp_path / "server",
        initial_weights=update.weights,
        initial_bank=bank,
        num_rounds=2,
        log=lines.append,
    )
    request = coordinator.round_request(1)
    assert request.config["run-id"] == (tmp_path / "server" / "run_id.txt").read_text().strip()
    refusal = RoundRefused("site_1", 1, "refused (budget): this round would raise epsilon from 7.9 to 8.4")
    failure = SiteFailure(1, "site_1", 7, f"error reply: {format_site_error('site_1', refusal)}")
    record = coordinator.complete_round(1, [update], [failure], num_sampled=2)
    assert record["aggregated"] and record["num_updates"] == 1
    assert record["epsilon"] == {"site_0": pytest.approx(update.metrics["epsilon"])}
    assert "train_loss" not in record  # DP sites send none
    assert failure.refused
    assert any("site_1" in line and "refused the round" in line and "refused (budget)" in line for line in lines)
    assert not math.isnan(record["seconds"]["aggregation"])
