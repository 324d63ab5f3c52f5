"""Ledger durability and idempotency, accountant rebuild, epsilon vs Google's dp-accounting, policy, release,
canary bound and the audit CLI."""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.config import PrivacyPolicy
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.privacy.accountant import RDP_ORDERS, AccountedStep, calibrate_noise_multiplier, compute_epsilon
from mlip_fed.privacy.canary import audit_scores, epsilon_lower_bound, one_run_p_value
from mlip_fed.privacy.ledger import LedgerConflict, LedgerEvent, PrivacyLedger
from mlip_fed.privacy.release import release_prototypes
from mlip_fed.privacy.site_privacy import PrivacyRefused, SitePrivacy


def train_event(rnd: int, run: str = "run-a", steps: int = 50, sigma: float = 1.2, q: float = 0.02) -> LedgerEvent:
    return LedgerEvent(run, rnd, "train", "bucketed", sigma, sigma / 2, q, steps)


def test_ledger_survives_restart_and_is_idempotent(tmp_path) -> None:
    path = tmp_path / "site.db"
    with PrivacyLedger(path) as ledger:
        assert ledger.record(train_event(1)) is True
        assert ledger.record(train_event(1)) is False  # a retried round: no double count
        with pytest.raises(LedgerConflict, match="round 1"):
            ledger.record(train_event(1, steps=51))
        with pytest.raises(RuntimeError, match="boom"), ledger.transaction() as cur:
            ledger.record(train_event(2), cur)
            raise RuntimeError("boom")  # crash mid-transaction: the insert is rolled back
    with PrivacyLedger(path) as reopened:  # restart
        events = reopened.events()
        assert [(e.run_id, e.round, e.steps) for e in events] == [("run-a", 1, 50)]
        reopened.record(train_event(2))
        reopened.record(train_event(1, run="run-b"))  # a new run continues the same ledger
        assert len(reopened.accounted_steps()) == 3


def test_rebuilt_accountant_equals_live_accountant(tmp_path) -> None:
    live = RDPAccountant()
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        for rnd, (sigma, q, steps) in enumerate([(1.2, 0.02, 30), (1.2, 0.02, 30), (2.0, 0.05, 10)], start=1):
            for _ in range(steps):
                live.step(noise_multiplier=sigma / 2, sample_rate=q)
            ledger.record(train_event(rnd, sigma=sigma, q=q, steps=steps))
        rebuilt = compute_epsilon(ledger.accounted_steps(), 1e-5, with_prv=False)
    assert rebuilt.rdp == pytest.approx(live.get_privacy_spent(delta=1e-5, alphas=list(RDP_ORDERS))[0], rel=1e-12)


def test_epsilon_matches_dp_accounting_rdp_for_heterogeneous_history() -> None:
    history = [
        AccountedStep(0.6, 0.0128, 390),
        AccountedStep(0.6, 0.0128, 390),
        AccountedStep(1.0 / math.sqrt(3 * 14) * 4.0, 1.0, 1),  # a prototype release (sample rate 1)
        AccountedStep(0.9, 0.05, 40),
        AccountedStep(4.0 / math.sqrt(3 * 14), 1.0, 1),
    ]
    google = RdpAccountant(orders=list(RDP_ORDERS))
    for s in history:
        inner = dp_accounting.GaussianDpEvent(s.noise_multiplier)
        event = inner if s.sample_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(s.sample_rate, inner)
        google.compose(dp_accounting.SelfComposedDpEvent(event, s.steps))
    for delta in (1e-5, 1e-6):
        assert compute_epsilon(history, delta, with_prv=False).rdp == pytest.approx(google.get_epsilon(delta), abs=1e-6)
    ours = compute_epsilon(history, 1e-5)
    assert ours.prv is not None and ours.prv < ours.rdp and ours.epsilon == max(ours.rdp, ours.prv)


def test_calibration_hits_target_for_the_whole_schedule() -> None:
    sigma = calibrate_noise_multiplier(8.0, 1e-5, 0.0128, 3900, sensitivity_factor=2.0)
    assert sigma == pytest.approx(1.66, abs=0.03)  # bucketed (accounted at sigma/2): eps = 8 needs sigma = 1.66
    eps = compute_epsilon([AccountedStep(sigma / 2, 0.0128, 3900)], 1e-5, with_prv=False).rdp
    assert eps <= 8.0 and eps > 7.9


def policy(**kw) -> PrivacyPolicy:
    base = {"mechanism": "bucketed", "epsilon_budget": 12.0, "delta": 1e-4, "noise_multiplier": 1.5}
    return PrivacyPolicy(**{**base, **kw})


def test_policy_refuses_budget_delta_and_noise(tmp_path) -> None:
    site = SitePrivacy(policy(), tmp_path / "a.db", num_records=1000, run_id="r1")
    assert site.plan_round(1, steps=50, sample_rate=0.02) is None
    refusal = site.plan_round(1, steps=20_000, sample_rate=0.02)
    assert refusal is not None and refusal.code == "budget" and "epsilon_budget=12" in refusal.reason
    site.close()
    big_delta = SitePrivacy(policy(delta=1e-2), tmp_path / "b.db", num_records=1000, run_id="r1")
    refusal = big_delta.plan_round(1, steps=10, sample_rate=0.02)
    assert refusal is not None and refusal.code == "delta" and "1/N" in refusal.reason
    big_delta.close()
    site = SitePrivacy(policy(min_noise_multiplier=1.0), tmp_path / "c.db", num_records=1000, run_id="r1")
    site.noise_multiplier = 0.5  # e.g. a server request to loosen the noise
    refusal = site.plan_round(1, steps=10, sample_rate=0.02)
    assert refusal is not None and refusal.code == "noise"
    site.close()


def test_record_training_charges_once_and_refuses_past_budget(tmp_path) -> None:
    site = SitePrivacy(policy(release_prototypes=False), tmp_path / "a.db", num_records=1000, run_id="r1")
    assert site.record_training(1, steps=50, sample_rate=0.02) is True
    eps1 = site.epsilon().epsilon
    assert site.record_training(1, steps=50, sample_rate=0.02) is False  # retry after a crash
    assert site.epsilon().epsilon == eps1
    with pytest.raises(PrivacyRefused, match="budget"):
        site.record_training(2, steps=100_000, sample_rate=0.02)
    site.close()


def test_release_noises_then_thresholds_noisy_counts(tmp_path) -> None:
    k, d = 14, 8
    sums = torch.zeros(k, d)
    counts = torch.zeros(k)
    counts[0], sums[0] = 200.0, 3.0
    gen = torch.Generator().manual_seed(0)
    rel = release_prototypes(
        sums, sums, counts, noise_multiplier=2.0, contribution_bound=1, threshold=20.0, generator=gen
    )
    assert bool(rel.kept[0]) and not rel.kept[1:].any()  # true 0 counts + N(0, 4) never reach 20
    assert (rel.sum_image[1:] == 0).all() and (rel.count[1:] == 0).all()
    assert rel.count[0] != 200.0 and abs(float(rel.count[0]) - 200.0) < 10  # noisy, not exact
    assert rel.effective_noise_multiplier == pytest.approx(2.0 / math.sqrt(3))
    # threshold applies to NOISY counts: a true count just above the threshold can be suppressed
    counts2 = torch.full((k,), 20.0)
    kept = release_prototypes(
        torch.zeros(k, d),
        torch.zeros(k, d),
        counts2,
        noise_multiplier=5.0,
        contribution_bound=1,
        threshold=20.0,
        generator=torch.Generator().manual_seed(1),
    ).kept
    assert 0 < int(kept.sum()) < k
    # the façade charges the ledger (Gaussian event, sample rate 1)
    site = SitePrivacy(policy(epsilon_budget=50.0), tmp_path / "s.db", num_records=1000, run_id="r1")
    bank = PrototypeBank(dim=d)
    bank.count[:] = counts
    site.release_bank(bank, rnd := 1)
    [event] = site.ledger.events()
    assert (event.kind, event.mechanism, event.sample_rate, event.round) == ("prototype_release", "gaussian", 1.0, rnd)
    assert event.effective_noise_multiplier == pytest.approx(4.0 / math.sqrt(3 * 14))
    with pytest.raises(ValueError, match="prototype_contribution_bound"):
        site.release_bank(bank, 2, observed_contributions=15)
    site.close()


def test_canary_bound_math() -> None:
    # all r guesses correct, delta = 0: p(eps) = q^r, so eps_lb = logit(0.05 ** (1 / r))
    r = 100
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)
    assert epsilon_lower_bound(1000, r, r // 2, 1e-5) == 0.0  # chance-level guessing proves nothing
    assert epsilon_lower_bound(1000, r, 80, 1e-5) < epsilon_lower_bound(1000, r, 90, 1e-5)
    # p(eps) grows with eps (q = e^eps / (1 + e^eps) grows): the bound is the largest eps still rejected
    assert one_run_p_value(1.0, 1e-5, 1000, r, 80) < one_run_p_value(3.0, 1e-5, 1000, r, 80)
    scores = [float(i) for i in range(200)]
    included = [i >= 100 for i in range(200)]  # a perfect attack
    audit = audit_scores(scores, included, k_plus=50, k_minus=50, delta=1e-5)
    assert audit.correct == 100 and audit.epsilon_lower_bound > 3.0


def test_audit_cli_reports_numbers_and_warnings(tmp_path, capsys) -> None:
    path = tmp_path / "site.db"
    site = SitePrivacy(policy(epsilon_budget=20.0, secure_mode=False), path, num_records=1000, run_id="r1", site="h")
    site.record_training(1, steps=50, sample_rate=0.02)
    site.release_bank(PrototypeBank(dim=8), 1)
    site.record_training(2, steps=50, sample_rate=0.02)
    site.record_unaccounted(2, "train_loss")
    expected = site.epsilon()
    site.close()
    assert privacy_main(["audit", "--ledger", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] == pytest.approx(expected.epsilon, rel=1e-9)
    assert report["remaining_budget"] == pytest.approx(20.0 - expected.epsilon, rel=1e-9)
    assert [p["round"] for p in report["per_round"]] == [1, 2]
    assert report["per_round"][0]["epsilon_rdp"] < report["per_round"][1]["epsilon_rdp"]
    assert any("unaccounted release: unaccounted:train_loss" in w for w in report["warnings"])
    assert any("secure_mode=false" in w for w in report["warnings"])
    assert report["private"] is True and not any("NOT PRIVATE" in w for w in report["warnings"])
    out = tmp_path / "audit.html"
    assert privacy_main(["audit", "--ledger", str(path), "--format", "html", "--out", str(out)]) == 0
    assert "data:image/png;base64," in out.read_text()
    assert privacy_main(["audit", "--ledger", str(tmp_path / "missing.db")]) == 2


def test_calibration_failure_names_the_prototype_release_cost(tmp_path) -> None:
    """A site YAML that leaves prototype_noise_multiplier at its default cannot afford two releases at epsilon 8:
    the error must say so, not just that calibration failed."""
    expensive = policy(noise_multiplier=None, epsilon_budget=8.0, delta=1e-5, prototype_noise_multiplier=4.0)
    site = SitePrivacy(expensive, tmp_path / "a.db", num_records=100, run_id="r1")
    with pytest.raises(ValueError, match=r"prototype release\(s\) alone: epsilon (\d+\.?\d*)") as err:
        site.calibrate(total_steps=4, sample_rate=0.9, releases=2)
    release_eps = float(re.search(r"release\(s\) alone: epsilon ([\d.]+)", str(err.value)).group(1))
    assert release_eps > 8.0 and "prototype_noise_multiplier=4.0" in str(err.value)
    site.close()
    cheap = policy(noise_multiplier=None, epsilon_budget=8.0, delta=1e-5, prototype_noise_multiplier=20.0)
    site = SitePrivacy(cheap, tmp_path / "b.db", num_records=100, run_id="r1")
    assert site.calibrate(total_steps=4, sample_rate=0.9, releases=2) > 0  # the same plan fits with sigma_proto 20
    site.close()
