"""Issue #13 item 8: canaries that travel through the prototype-bank release (``canary-run --canary-kind release``).

Parameters (docs/privacy.md, "release: prototype-release canaries"): the bucketed policy's release (sigma 20, L = 14:
z = 3.09, one release charges epsilon 1.34 at delta 1e-5), 100 000 canaries, 1000 guesses each way. Measured over
seeds 0-4: correct release 0.74-0.84 (PASS), 2x under-noised 1.59-1.76 (FAIL).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.config_compose import compose_experiment
from mlip_fed.privacy.canary_run import NoiseOffRefused
from mlip_fed.privacy.release import release_prototypes
from mlip_fed.privacy.release_canaries import (
    release_canary_bank,
    release_canary_scores,
    run_release_canary_audit,
)

POLICY = ["experiment=smoke", "privacy=bucketed"]
CLI_AUDIT = ["--canary-kind", "release", "--canaries", "100000", "--k-plus", "1000", "--k-minus", "1000"]


def test_each_canary_is_a_unit_at_the_accounted_bound_on_rows_of_its_own() -> None:
    included = np.array([True, False, True, True])
    rows = 3
    sum_image, sum_text, count, signs = release_canary_bank(included, rows, background=7.0, seed=0)
    assert sum_image.shape == (4 * rows, 1) and count.shape == (4 * rows,)
    for i, inc in enumerate(included):
        own = slice(i * rows, (i + 1) * rows)
        # per statistic: L rows moved by exactly 1 (norm sqrt(L)); nothing outside its own rows
        assert torch.equal(sum_image[own, 0], torch.full((rows,), float(signs[i]) * inc))
        assert torch.equal(sum_text[own, 0], sum_image[own, 0])
        assert torch.equal(count[own], torch.full((rows,), 7.0 + inc))
    # noise off, nothing suppressed: the score is 3 L for an included canary, 0 for an excluded one
    release = release_prototypes(
        sum_image,
        sum_text,
        count,
        noise_multiplier=1.0,
        contribution_bound=rows,
        threshold=5.0,
        generator=torch.Generator().manual_seed(0),
        noise_applied_fraction=0.0,
    )
    assert release.noise_multiplier == 1.0 and release.effective_noise_multiplier == pytest.approx(1 / math.sqrt(9))
    np.testing.assert_allclose(release_canary_scores(release, signs, rows, 7.0), 3 * rows * included)
    with pytest.raises(ValueError, match="noise_applied_fraction"):
        release_prototypes(
            sum_image, sum_text, count, noise_multiplier=1.0, contribution_bound=rows, threshold=5.0,
            generator=torch.Generator(), noise_applied_fraction=1.5,
        )  # fmt: skip


def test_release_under_noising_is_refused_without_the_flag(tmp_path, capsys) -> None:
    cfg = compose_experiment(POLICY)
    with pytest.raises(NoiseOffRefused, match="2x under-noising .*--i-know-this-is-broken"):
        run_release_canary_audit(cfg, tmp_path / "f", m=10, noise_applied_fraction=0.5)
    assert not (tmp_path / "f").exists()
    for argv in (["--noise-applied-fraction", "0.5"], ["--noise-off"]):
        out = tmp_path / "cli"
        assert privacy_main(["canary-run", "--out", str(out), "--canary-kind", "release", *argv, *POLICY]) == 2
        assert "--i-know-this-is-broken" in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(ValueError, match="privacy.mechanism='none'"):
        run_release_canary_audit(compose_experiment(["experiment=smoke"]), tmp_path / "n", m=10)


def test_correctly_noised_release_passes(tmp_path) -> None:
    report = run_release_canary_audit(compose_experiment(POLICY), tmp_path, m=100_000, k_plus=1000, k_minus=1000)
    assert report.noise_applied_fraction == 1.0 and report.noise_multiplier_applied == report.noise_multiplier_claimed
    assert report.effective_noise_multiplier == pytest.approx(20 / math.sqrt(42))
    assert report.rows == 1_400_000 and report.rows_suppressed == 0
    assert report.passed and report.epsilon_lower_bound <= report.release_epsilon
    assert report.text().startswith("One-run canary audit (prototype release, release canaries")
    with open(tmp_path / "canaries.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 100_000 and {"score", "included"} <= set(rows[0])


def test_two_x_under_noised_release_fails(tmp_path, capsys) -> None:
    out = tmp_path / "half"
    code = privacy_main(
        ["canary-run", "--out", str(out), *CLI_AUDIT, "--noise-applied-fraction", "0.5", "--i-know-this-is-broken"]
        + ["--format", "json", *POLICY]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["passed"] is False and report["kind"] == "release"
    assert report["noise_multiplier_applied"] == pytest.approx(report["noise_multiplier_claimed"] / 2)
    assert report["verdict_against"] == "release_epsilon"
    assert report["epsilon_lower_bound"] > report["release_epsilon"]
    assert (out / "report.txt").read_text().startswith("!! UNDER-NOISED 2x: deliberately broken configuration")
    assert json.loads((out / "report.json").read_text())["overrides"] == POLICY
