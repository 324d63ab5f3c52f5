"""``privacy.accountant`` decides which bound the budget, the calibration and the reported epsilon use, and a site
round computes the PRV accountant over its whole ledger history once, not once per check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mlip_fed.privacy.accountant as accountant_module
from mlip_fed.config import PrivacyPolicy
from mlip_fed.privacy.accountant import AccountedStep, compute_epsilon
from mlip_fed.privacy.policy import check_round
from mlip_fed.privacy.site_privacy import SitePrivacy

K, D = 14, 4


@pytest.fixture
def prv_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count PRV evaluations (``PRVAccountant.get_epsilon``), whatever caching sits above them."""
    calls: list[int] = []
    original = accountant_module.PRVAccountant

    class Counting(original):  # type: ignore[misc, valid-type]
        def get_epsilon(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().get_epsilon(*args, **kwargs)

    monkeypatch.setattr(accountant_module, "PRVAccountant", Counting)
    cache_clear = getattr(accountant_module, "clear_cache", None)
    if cache_clear is not None:
        cache_clear()
    return calls


def _policy(**kw: object) -> PrivacyPolicy:
    base = {
        "mechanism": "bucketed",
        "epsilon_budget": 50.0,
        "noise_multiplier": 2.0,
        "prototype_noise_multiplier": 20.0,
        "prototype_count_threshold": 0.0,
    }
    return PrivacyPolicy.model_validate({**base, **kw})


def _bank() -> SimpleNamespace:
    return SimpleNamespace(sum_image=torch.zeros(K, D), sum_text=torch.zeros(K, D), count=torch.zeros(K))


def _round(sp: SitePrivacy, rnd: int) -> None:
    """What ``SiteRuntime._compute_round_dp`` does with the accountant in one round."""
    assert sp.plan_round(rnd, steps=5, sample_rate=0.1) is None
    sp.record_training(rnd, steps=5, sample_rate=0.1)
    sp.release_bank(_bank(), rnd, observed_contributions=1)
    sp.epsilon()


def test_a_round_computes_prv_over_the_history_once(tmp_path, prv_calls: list[int]) -> None:
    sp = SitePrivacy(_policy(), tmp_path / "ledger.sqlite", num_records=1000, run_id="r", site="s")
    try:
        _round(sp, 1)
        assert len(prv_calls) == 1, f"PRV computed {len(prv_calls)} times in one round"
        _round(sp, 2)
        assert len(prv_calls) == 2
        assert sp.epsilon().prv is not None  # still reported
        assert len(prv_calls) == 2  # cached: the same history again costs nothing
    finally:
        sp.close()


def _steps_where_prv_is_below_rdp() -> list[AccountedStep]:
    return [AccountedStep(0.9, 0.05, 400)]


def test_accountant_field_selects_the_bound() -> None:
    steps = _steps_where_prv_is_below_rdp()
    both = compute_epsilon(steps, 1e-5)
    assert both.prv is not None and both.prv < both.rdp - 0.2
    assert compute_epsilon(steps, 1e-5, accountant="rdp").epsilon == pytest.approx(both.rdp)
    assert compute_epsilon(steps, 1e-5, accountant="prv").epsilon == pytest.approx(both.prv)
    assert compute_epsilon(steps, 1e-5, accountant="max").epsilon == pytest.approx(max(both.rdp, both.prv))
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon(steps, 1e-5, accountant="gdp")


def test_policy_budget_check_uses_the_sites_accountant() -> None:
    steps = _steps_where_prv_is_below_rdp()
    both = compute_epsilon(steps, 1e-5)
    budget = (both.rdp + both.prv) / 2  # above PRV, below RDP
    for name, refused in (("rdp", True), ("max", True), ("prv", False)):
        policy = _policy(epsilon_budget=budget, accountant=name)
        refusal = check_round(policy, [], steps, num_records=10_000, noise_multiplier=1.8)
        assert (refusal is not None) is refused, (name, refusal)
    assert PrivacyPolicy().accountant == "max"  # default: the larger of the two bounds


def test_rdp_accountant_skips_prv_in_the_round(tmp_path, prv_calls: list[int]) -> None:
    sp = SitePrivacy(_policy(accountant="rdp"), tmp_path / "ledger.sqlite", num_records=1000, run_id="r", site="s")
    try:
        _round(sp, 1)
        report = sp.epsilon()
        assert report.epsilon == pytest.approx(report.rdp)
        assert prv_calls == []
    finally:
        sp.close()
