"""Client-level DP: the site sample is the Poisson sample the accountant charges (q = fraction_train, secret), a
round's denominator is the fixed expected count q*K, an empty sample still releases noise, and bank statistics that
no DP covers are never merged into the released global bank."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from conftest import D, site_update

from mlip_fed.config import ConfigError, ExperimentConfig, FederationConfig, PrivacyPolicy
from mlip_fed.federation.coordinator import FederationCoordinator
from mlip_fed.federation.payload import SiteUpdate
from mlip_fed.model.objectives.prototype_bank import PrototypeBank

DP_SITES = PrivacyPolicy(mechanism="bucketed", epsilon_budget=8.0)


def _coordinator(tmp_path: Path, privacy: PrivacyPolicy = DP_SITES, **federation: object) -> FederationCoordinator:
    base = {"client_dp": True, "client_dp_noise_multiplier": 1.0, "client_dp_clipping_norm": 1.0, "num_rounds": 50}
    fed = FederationConfig.model_validate({**base, **federation})
    return FederationCoordinator(
        ExperimentConfig(federation=fed, privacy=privacy),
        tmp_path / "run",
        initial_weights={"w": torch.zeros(2)},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=None,
        log=lambda _: None,
    )


def _update(site: str, value: float, count: float = 0.0, dp: bool = True) -> SiteUpdate:
    """A site's update with ``count`` studies of category 0; with ``dp``, the ε a DP site's metrics carry."""
    return site_update(site, value, count0=count, sum_at=(0, 0), metrics={"epsilon": 1.0} if dp else {})


def test_site_sample_is_poisson_at_fraction_train(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, fraction_train=0.25, min_train_nodes=2)
    coord.start()
    nodes = list(range(1000, 1200))
    sizes = []
    for rnd in range(1, 31):
        selected = coord.select_nodes(nodes, rnd)
        assert set(selected) <= set(nodes) and selected == sorted(set(selected))
        sizes.append(len(selected))
        if rnd > 2:  # accounting the first rounds is enough (PRV over a growing history is the slow part)
            continue
        record = coord.complete_round(rnd, [], [], num_sampled=len(selected))
        entry = record["client_dp"]
        # accounted as sampled: Poisson at q = fraction_train, denominator the expected count q*K, not the realised one
        assert entry["sample_rate"] == pytest.approx(0.25)
        assert entry["expected_sites"] == pytest.approx(0.25 * 200)
        assert entry["noise_std"] == pytest.approx(1.0 * 1.0 / 50)
    assert len(set(sizes)) > 3  # a fixed-size sample would always have ceil(0.25 * 200) = 50
    assert abs(statistics.mean(sizes) - 50) < 6


def test_an_empty_poisson_sample_still_releases_a_noised_round(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, fraction_train=1e-9, min_train_nodes=2)
    coord.start()
    assert coord.select_nodes([1, 2, 3], 1) == []  # min_train_nodes does not apply to the Poisson sample
    record = coord.complete_round(1, [], [], num_sampled=0)
    assert record["aggregated"] and record["client_dp"]["rounds_accounted"] == 1
    assert not torch.equal(coord.state.weights["w"], torch.zeros(2))  # noise only: the empty sample is not revealed


def test_sites_without_sample_level_dp_are_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _coordinator(tmp_path, privacy=PrivacyPolicy())
    message = str(err.value)
    assert "federation.client_dp" in message and "privacy.mechanism" in message


def test_a_bank_no_dp_covers_is_not_merged(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path)
    coord.start()
    before = {k: v.clone() for k, v in coord.state.bank.items()}
    record = coord.complete_round(1, [_update("plain", 0.1, count=50.0, dp=False)], [], num_sampled=1)
    assert record["bank_excluded"] == ["plain"]
    assert all(torch.equal(coord.state.bank[k], before[k]) for k in before)  # the raw bank never reached it
    record = coord.complete_round(2, [_update("dp", 0.1, count=50.0)], [], num_sampled=1)
    assert "bank_excluded" not in record and record["bank_updated"] > 0  # a DP site's noised release is merged
