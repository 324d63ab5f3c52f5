"""Issue #13 item 8: the canary audit judges each gradient canary against its own epsilon (a unit of sensitivity C at
sigma), so a 2x under-noised engine FAILs while the correctly noised run with the same parameters PASSes.

Parameters (docs/privacy.md, "Under-noising"): bucketed DP at epsilon 2, q = 1, one step, 100 000 Dirac canaries,
1000 guesses each way. The correct sigma gives one canary unit epsilon 0.94; at sigma/2 a canary's true epsilon is
the patient claim (2.0) and the guesses certify about 1.1-1.2 (seeds 0-3 measured), above 0.94 but below 2.0: the
old comparison against the patient claim could not see it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.config_compose import compose_experiment
from mlip_fed.privacy.canary_run import CanaryRunReport, NoiseOffRefused, check_noise_applied, run_canary_audit

TINY = [
    "experiment=smoke",
    "objectives=clip_only",
    "privacy=bucketed",
    "privacy.epsilon_budget=2",
    "data.image_size=32",
    "data.synthetic.num_sites=1",
    "data.synthetic.studies_per_site=8",
    "train.num_threads=1",
    "train.progress_bar=false",
]
#: m, k+/k-, steps, q of the audit that separates 1x from 2x (docs/privacy.md)
AUDIT = {"m": 100_000, "k_plus": 1000, "k_minus": 1000, "steps": 1, "sample_rate": 1.0}
CLI_AUDIT = ["--canaries", "100000", "--k-plus", "1000", "--k-minus", "1000", "--steps", "1", "--sample-rate", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


def _report(**changes: object) -> CanaryRunReport:
    base: dict = dict(
        mechanism="bucketed",
        kind="gradient",
        noise_off=False,
        noise_applied_fraction=1.0,
        canaries=1000,
        included=500,
        guesses=500,
        k_plus=250,
        k_minus=250,
        correct=300,
        epsilon_lower_bound=1.2,
        confidence=0.95,
        delta=1e-5,
        claimed_epsilon=2.0,
        claimed_epsilon_rdp=2.0,
        claimed_epsilon_prv=1.85,
        canary_unit_epsilon=0.94,
        noise_multiplier_claimed=4.3,
        noise_multiplier_applied=4.3,
        sample_rate=1.0,
        steps=1,
        num_buckets=8,
        clipping_norm=1.0,
        site_records=19,
        seconds=1.0,
    )
    return CanaryRunReport(**{**base, **changes})


def test_verdict_uses_the_canary_unit_epsilon_for_gradient_canaries() -> None:
    # canary-unit epsilon 0.94 < lower bound 1.2 < patient claim 2.0
    grad = _report()
    assert grad.verdict_against == "canary_unit_epsilon" and grad.verdict_epsilon == 0.94
    assert not grad.passed  # the patient claim (2.0) would have passed it
    assert "FAIL (lower bound 1.2000 > canary-unit epsilon 0.9400" in grad.text()
    assert grad.to_dict()["verdict_against"] == "canary_unit_epsilon" and grad.to_dict()["passed"] is False
    assert {"claimed_epsilon", "canary_unit_epsilon", "verdict_epsilon"} <= set(grad.to_dict())
    # an input canary is a patient, bucketed like any other: the patient claim applies to it
    inp = _report(kind="input")
    assert inp.verdict_against == "claimed_epsilon" and inp.passed
    assert "PASS (lower bound 1.2000 <= claimed epsilon 2.0000" in inp.text()
    assert _report(epsilon_lower_bound=0.9).passed


def test_broken_configuration_says_so_and_by_how_much_on_its_first_line() -> None:
    assert _report().text().startswith("One-run canary audit")
    half = _report(noise_applied_fraction=0.5, noise_multiplier_applied=2.15)
    assert half.text().startswith("!! UNDER-NOISED 2x: deliberately broken configuration")
    assert "adds 0.5 of it: sigma=2.15" in half.text().splitlines()[0]
    assert _report(noise_applied_fraction=0.25).text().startswith("!! UNDER-NOISED 4x")
    off = _report(noise_off=True, noise_applied_fraction=0.0, noise_multiplier_applied=0.0)
    assert off.text().startswith("!! NOISE OFF: deliberately broken configuration")
    assert off.to_dict()["deliberately_broken"] and not _report().to_dict()["deliberately_broken"]


def test_under_noising_is_refused_without_the_flag(tmp_path, capsys) -> None:
    cfg = compose_experiment(TINY)
    with pytest.raises(NoiseOffRefused, match="2x under-noising .*--i-know-this-is-broken"):
        run_canary_audit(cfg, tmp_path, m=4, steps=1, sample_rate=1.0, noise_applied_fraction=0.5)
    assert not any(tmp_path.iterdir())  # refused before anything was generated or trained
    for argv in (
        ["--noise-applied-fraction", "0.5"],
        ["--noise-applied-fraction", "0.25"],
        ["--noise-applied-fraction", "0"],
        ["--noise-off"],
    ):
        out = tmp_path / "cli"
        assert privacy_main(["canary-run", "--out", str(out), *argv, *TINY]) == 2
        assert "--i-know-this-is-broken" in capsys.readouterr().err
        assert not out.exists()
    check_noise_applied(1.0, False)  # the correct configuration needs no flag
    check_noise_applied(0.5, True)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        check_noise_applied(1.5, True)
    code = privacy_main(
        ["canary-run", "--out", str(tmp_path / "x"), "--noise-off", "--noise-applied-fraction", "0.5"]
        + ["--i-know-this-is-broken", *TINY]
    )
    assert code == 2 and "--noise-off means noise applied fraction 0" in capsys.readouterr().err


def test_two_x_under_noised_gradient_audit_fails(tmp_path, data_root, capsys) -> None:
    out = tmp_path / "half"
    code = privacy_main(
        ["canary-run", "--out", str(out), *CLI_AUDIT, "--noise-applied-fraction", "0.5", "--i-know-this-is-broken"]
        + ["--format", "json", f"data.root={data_root}", *TINY]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["passed"] is False
    assert report["noise_applied_fraction"] == 0.5 and report["noise_off"] is False
    assert report["noise_multiplier_applied"] == pytest.approx(report["noise_multiplier_claimed"] / 2)
    assert report["verdict_against"] == "canary_unit_epsilon"
    # caught against the canary's own epsilon; the patient claim (sigma/2) would have passed it
    assert report["canary_unit_epsilon"] < report["epsilon_lower_bound"] < report["claimed_epsilon"]
    assert (out / "report.txt").read_text().startswith("!! UNDER-NOISED 2x: deliberately broken configuration")


def test_correctly_noised_gradient_audit_passes_with_the_same_parameters(tmp_path, data_root) -> None:
    cfg = compose_experiment([*TINY, f"data.root={data_root}"])
    report = run_canary_audit(cfg, tmp_path / "ok", **AUDIT)
    assert report.noise_applied_fraction == 1.0 and report.noise_multiplier_applied == report.noise_multiplier_claimed
    assert report.verdict_against == "canary_unit_epsilon"
    assert report.passed and report.epsilon_lower_bound <= report.canary_unit_epsilon
    assert report.text().startswith("One-run canary audit (bucketed, gradient canaries")
