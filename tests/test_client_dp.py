"""Client-level DP (DP-FedAvg): clip bound, noise scale, equal weights, accountant vs dp-accounting, resume."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from conftest import D, site_update
from dp_accounting.rdp import RdpAccountant

from mlip_fed.config import ExperimentConfig, FederationConfig, PrivacyPolicy
from mlip_fed.federation.client_dp import (
    ClientDPAccountant,
    ClientDPEvent,
    ClientDPSettings,
    clip_delta,
    dp_fedavg,
    l2_norm,
    settings_from_config,
    update_delta,
)
from mlip_fed.federation.coordinator import FederationCoordinator
from mlip_fed.federation.payload import SiteUpdate
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.privacy.accountant import RDP_ORDERS


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _states(n: int, scale: float, size: int = 50) -> list[dict[str, torch.Tensor]]:
    g = _gen(1)
    return [
        {
            "a": torch.randn(size, generator=g) * scale,
            "b": torch.randn(3, 4, generator=g) * scale,
            "step": torch.tensor(i),
        }
        for i in range(n)
    ]


def test_clip_bounds_each_update_and_leaves_small_ones_alone() -> None:
    global_w = {"a": torch.zeros(50), "b": torch.zeros(3, 4), "step": torch.tensor(0)}
    for scale, expect_clip in ((10.0, True), (1e-3, False)):
        for state in _states(4, scale):
            delta = update_delta(state, global_w)
            assert "step" not in delta  # integer buffers are not part of the released vector
            clipped, norm, was_clipped = clip_delta(delta, 1.5)
            assert was_clipped is expect_clip
            assert l2_norm(clipped) <= 1.5 + 1e-9
            if not expect_clip:
                assert all(torch.equal(clipped[k], delta[k]) for k in delta)
            else:
                assert norm > 1.5 and l2_norm(clipped) == pytest.approx(1.5, rel=1e-9)


def test_one_site_moves_the_noised_mean_by_at_most_s_over_m() -> None:
    """Neighbouring site sets with the same noise stream: the outputs differ by exactly clip(Δ)/m, norm ≤ S/m."""
    settings = ClientDPSettings(noise_multiplier=1.0, clipping_norm=2.0, delta=1e-5)
    global_w = {"a": torch.zeros(50, dtype=torch.float64), "b": torch.zeros(3, 4, dtype=torch.float64)}
    sites = [{k: v.to(torch.float64) for k, v in s.items() if k != "step"} for s in _states(3, 100.0)]
    with_all = dp_fedavg(global_w, sites, settings, expected_sites=3, generator=_gen(5))
    without_last = dp_fedavg(global_w, sites[:2], settings, expected_sites=3, generator=_gen(5))
    diff = {k: with_all.weights[k] - without_last.weights[k] for k in global_w}
    assert l2_norm(diff) == pytest.approx(2.0 / 3, rel=1e-9)  # this update was clipped to S exactly
    assert with_all.clipped_fraction == 1.0 and with_all.noise_std == pytest.approx(2.0 / 3)


def test_noise_std_matches_z_s_over_m() -> None:
    z, s, m = 1.3, 0.7, 4
    settings = ClientDPSettings(noise_multiplier=z, clipping_norm=s, delta=1e-5)
    global_w = {"w": torch.zeros(400_000, dtype=torch.float64), "step": torch.tensor(3)}
    out = dp_fedavg(global_w, [], settings, expected_sites=m, generator=_gen(11))
    noise = out.weights["w"]
    assert float(noise.std()) == pytest.approx(z * s / m, rel=0.01)
    assert abs(float(noise.mean())) < 5 * z * s / m / math.sqrt(noise.numel())
    assert torch.equal(out.weights["step"], torch.tensor(3))  # integer buffers keep the global value


def test_equal_weights_and_fixed_denominator() -> None:
    """Sites are averaged equally over m (not over replies, not by num_examples) before the noise."""
    settings = ClientDPSettings(noise_multiplier=1e-9, clipping_norm=10.0, delta=1e-5)
    global_w = {"w": torch.full((3,), 1.0, dtype=torch.float64)}
    sites = [{"w": torch.full((3,), 2.0, dtype=torch.float64)}, {"w": torch.full((3,), 4.0, dtype=torch.float64)}]
    out = dp_fedavg(global_w, sites, settings, expected_sites=2, generator=_gen())
    assert torch.allclose(out.weights["w"], torch.full((3,), 1.0 + (1.0 + 3.0) / 2, dtype=torch.float64), atol=1e-6)
    dropped = dp_fedavg(global_w, sites, settings, expected_sites=4, generator=_gen())  # two sampled sites silent
    assert torch.allclose(dropped.weights["w"], torch.full((3,), 1.0 + (1.0 + 3.0) / 4, dtype=torch.float64), atol=1e-6)
    # Poisson sampling can bring more sites than expected: still divided by the fixed m (sensitivity S/m).
    extra = dp_fedavg(global_w, sites, settings, expected_sites=1, generator=_gen())
    assert torch.allclose(extra.weights["w"], torch.full((3,), 1.0 + (1.0 + 3.0) / 1, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="must be > 0"):
        dp_fedavg(global_w, sites, settings, expected_sites=0, generator=_gen())


def _google_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = RdpAccountant(orders=list(RDP_ORDERS))
    inner = dp_accounting.GaussianDpEvent(z)
    event = inner if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, inner)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("z", "q"), [(1.0, 1.0), (1.5, 0.5)])
def test_accountant_matches_dp_accounting_and_grows_with_rounds(z: float, q: float) -> None:
    acc = ClientDPAccountant(1e-5, with_prv=False)
    previous = 0.0
    for r in range(1, 6):
        acc.record(ClientDPEvent(r, z, q))
        client, record = acc.client_report(), acc.record_report()
        assert client.rdp == pytest.approx(_google_epsilon(z, q, r, 1e-5), abs=1e-6)
        assert record.rdp == pytest.approx(_google_epsilon(z / 2, q, r, 1e-5), abs=1e-6)
        assert previous < client.epsilon < record.epsilon
        previous = client.epsilon


def test_config_refuses_half_configured_client_dp() -> None:
    with pytest.raises(ValueError, match="client_dp_noise_multiplier and federation.client_dp_clipping_norm"):
        settings_from_config(FederationConfig(client_dp=True))
    assert settings_from_config(FederationConfig()) is None
    with pytest.raises(ValueError):
        FederationConfig(client_dp=True, client_dp_noise_multiplier=-1.0, client_dp_clipping_norm=1.0)


# ---------------------------------------------------------------------------------------------- coordinator
def _update(site: str, value: float, n: int) -> SiteUpdate:
    return site_update(site, value, n, metrics={"epsilon": 1.0})  # a DP site's release: merged under client DP


def _coordinator(tmp_path: Path, **federation: object) -> FederationCoordinator:
    base = {"client_dp": True, "client_dp_noise_multiplier": 1e-6, "client_dp_clipping_norm": 1.0, "num_rounds": 3}
    fed = FederationConfig.model_validate({**base, **federation})
    return FederationCoordinator(
        # Client DP needs sample-level DP at the sites: it is refused where nothing would cover the banks.
        ExperimentConfig(federation=fed, privacy=PrivacyPolicy(mechanism="bucketed", epsilon_budget=8.0)),
        tmp_path / "run",
        initial_weights={"w": torch.zeros(2)},
        initial_bank=PrototypeBank(dim=D).state_dict(),
        evaluator=None,
        log=lambda _: None,
    )


def test_coordinator_applies_client_dp_and_resume_does_not_double_count(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path)
    coord.start()
    assert len(coord.select_nodes([10, 11, 12, 13], 1)) == 4  # K = 4 available, all sampled: q = 1
    rec = coord.complete_round(1, [_update("a", 0.1, 1), _update("b", 5.0, 1000)], [], num_sampled=4)
    # equal weights over m = 4, site b clipped to norm 1: each of its 2 coordinates moves by 1/sqrt(2)
    expected = (0.1 + 1 / math.sqrt(2)) / 4
    assert torch.allclose(coord.state.weights["w"], torch.full((2,), expected), atol=1e-4)
    entry = rec["client_dp"]
    assert entry["clipped_fraction"] == 0.5 and entry["sample_rate"] == 1.0 and entry["rounds_accounted"] == 1
    assert entry["epsilon_record_vs_model_observers"] > entry["epsilon"] > 0

    resumed = _coordinator(tmp_path, resume=True, fraction_train=0.5)
    assert resumed.client_dp_accountant is not None and resumed.client_dp_accountant.rounds == 1
    with pytest.raises(ValueError, match="round 1 is already accounted"):
        resumed.client_dp_accountant.record(ClientDPEvent(1, 1e-6, 1.0))
    with pytest.raises(ValueError, match="out of order"):
        resumed.complete_round(1, [_update("a", 0.1, 1)], [], num_sampled=2)
    # Poisson at q = fraction_train = 0.5 from secret entropy: the sample's size varies, its accounting does not.
    assert set(resumed.select_nodes([10, 11, 12, 13], 2)) <= {10, 11, 12, 13}
    rec2 = resumed.complete_round(2, [_update("a", 0.1, 1), _update("b", 0.2, 1)], [], num_sampled=2)
    assert rec2["client_dp"]["sample_rate"] == 0.5
    fresh = ClientDPAccountant(1e-5, [ClientDPEvent(1, 1e-6, 1.0), ClientDPEvent(2, 1e-6, 0.5)])
    assert rec2["client_dp"]["rounds_accounted"] == 2
    assert rec2["client_dp"]["epsilon"] == pytest.approx(fresh.client_report().epsilon, rel=1e-12)

    with pytest.raises(ValueError, match="used client DP"):
        _coordinator(tmp_path, resume=True, client_dp=False)


def test_equal_rounds_are_one_prv_entry_with_the_same_epsilon() -> None:
    """A long client-DP run costs one PRV composition per distinct (z, q), not one per round; same epsilon."""
    import warnings

    from opacus.accountants import PRVAccountant

    from mlip_fed.privacy.accountant import AccountedStep, clear_cache, compute_epsilon, history

    steps = [AccountedStep(1.0, 0.25, 1)] * 5 + [AccountedStep(2.0, 0.5, 1)] * 2
    assert history(steps) == [(1.0, 0.25, 5), (2.0, 0.5, 2)]
    clear_cache()
    merged = compute_epsilon(steps, 1e-5, with_prv=True)
    unmerged = PRVAccountant()
    unmerged.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in steps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert merged.prv == pytest.approx(unmerged.get_epsilon(delta=1e-5), rel=1e-6)
