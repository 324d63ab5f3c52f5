"""The end-to-end one-run canary audit: reproducible canaries and coins, the train-score-bound pipeline on a
tiny model, and the noise-off configuration refused unless it is explicitly confirmed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.config_compose import compose_experiment
from mlip_fed.data.imageio import read_image
from mlip_fed.privacy.accountant import AccountedStep, calibrate_noise_multiplier, compute_epsilon
from mlip_fed.privacy.canary import audit_scores
from mlip_fed.privacy.canary_run import (
    NoiseOffRefused,
    canary_inclusion,
    default_guesses,
    make_canaries,
    run_canary_audit,
)

TINY = [
    "experiment=smoke",
    "objectives=clip_only",
    "privacy=bucketed",
    "privacy.epsilon_budget=1",
    "data.image_size=32",
    "data.synthetic.num_sites=1",
    "data.synthetic.studies_per_site=8",
    "train.num_threads=1",
    "train.progress_bar=false",
]


class _Vocab:
    """Stands in for the tokenizer: canary reports draw whole words (>= 4 letters) from its vocabulary."""

    WORDS = ["effusion", "pleural", "cardiac", "nodule", "lungs", "heart", "opacity", "##ing", "[PAD]", "ap"]

    def get_vocab(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.WORDS)}


def test_inclusion_is_seeded_and_fair() -> None:
    first = canary_inclusion(400, seed=3)
    assert np.array_equal(first, canary_inclusion(400, seed=3))
    assert not np.array_equal(first, canary_inclusion(400, seed=4))
    assert 150 < int(first.sum()) < 250  # each coin is 1/2 (binomial sd 10)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        canary_inclusion(1, seed=0)


def test_canaries_are_reproducible_distinct_patients(tmp_path) -> None:
    vocab = _Vocab()
    a = make_canaries(5, tmp_path / "a", 32, vocab, seed=1)
    b = make_canaries(5, tmp_path / "b", 32, vocab, seed=1)
    c = make_canaries(5, tmp_path / "c", 32, vocab, seed=2)
    assert [r.report for r in a] == [r.report for r in b]
    assert [r.report for r in a] != [r.report for r in c]
    assert np.array_equal(read_image(a[0].image_path), read_image(b[0].image_path))
    assert len({r.patient_id for r in a}) == 5  # every canary is its own privacy unit
    assert all(set(r.report.rstrip(".").split()) <= set(_Vocab.WORDS[:7]) for r in a)  # whole words only
    assert read_image(a[0].image_path).shape == (32, 32)


def test_noise_off_is_refused_without_the_flag(tmp_path, capsys) -> None:
    cfg = compose_experiment(TINY)
    with pytest.raises(NoiseOffRefused, match="--i-know-noise-is-off"):
        run_canary_audit(cfg, tmp_path, m=4, steps=1, sample_rate=1.0, noise_off=True)
    assert not any(tmp_path.iterdir())  # refused before anything was generated or trained
    code = privacy_main(["canary-run", "--out", str(tmp_path / "cli"), "--noise-off", *TINY])
    assert code == 2
    assert "--i-know-noise-is-off" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_mechanism_none_has_no_claim_to_audit(tmp_path) -> None:
    cfg = compose_experiment([*TINY, "privacy=none"])
    with pytest.raises(ValueError, match="privacy.mechanism='none'"):
        run_canary_audit(cfg, tmp_path, m=4, steps=1, sample_rate=1.0)


def test_train_score_bound_pipeline_on_a_tiny_model(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = privacy_main(
        ["canary-run", "--out", str(out), "--canary-kind", "input", "--canaries", "6", "--steps", "2"]
        + ["--sample-rate", "0.5", "--format", "json", f"data.root={tmp_path / 'data'}", *TINY]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["passed"] else 1)
    # the claimed epsilon is the accountant's for exactly this run: sigma calibrated to the budget at (q, steps)
    sigma = calibrate_noise_multiplier(1.0, 1e-5, 0.5, 2, sensitivity_factor=2.0)
    assert report["noise_multiplier_claimed"] == pytest.approx(sigma)
    assert report["noise_multiplier_applied"] == pytest.approx(sigma)
    assert report["steps"] == 2
    expected = compute_epsilon([AccountedStep(sigma / 2, 0.5, 2)], 1e-5)
    assert report["claimed_epsilon"] == pytest.approx(expected.epsilon)
    assert report["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    # canaries.csv holds the secret coins and the scores; the bound is recomputable from it
    with open(out / "canaries.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    included = canary_inclusion(6, seed=0)
    assert [r["included"] == "1" for r in rows] == included.tolist()
    assert report["included"] == int(included.sum())
    scores = [float(r["score"]) for r in rows]
    for r in rows:  # score = margin under the trained model - margin at initialisation
        assert float(r["score"]) == pytest.approx(float(r["margin_trained"]) - float(r["margin_init"]), abs=1e-6)
    assert len(set(scores)) == 6  # training moved every canary's margin
    k_plus, k_minus = default_guesses(6, "input")
    again = audit_scores(scores, included, k_plus=k_plus, k_minus=k_minus, delta=1e-5)
    assert (report["correct"], report["epsilon_lower_bound"]) == (again.correct, again.epsilon_lower_bound)
    assert (out / "report.txt").read_text().startswith("One-run canary audit (bucketed, input canaries")
    assert json.loads((out / "report.json").read_text())["overrides"][-1] == "train.progress_bar=false"
    # the offline audit reads the same file
    code = privacy_main(["canary-audit", "--scores", str(out / "canaries.csv"), "--k-plus", str(k_plus)])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["canaries"] == 6


def test_noise_off_with_the_flag_trains_without_noise_and_says_so(tmp_path, capsys) -> None:
    out = tmp_path / "off"
    privacy_main(
        ["canary-run", "--out", str(out), "--canaries", "4", "--steps", "1", "--noise-off", "--i-know-noise-is-off"]
        + [f"data.root={tmp_path / 'data'}", *TINY]
    )
    text = capsys.readouterr().out
    assert text.startswith("!! NOISE OFF")
    report = json.loads((out / "report.json").read_text())
    assert report["noise_off"] is True and report["noise_multiplier_applied"] == 0.0
    assert report["noise_multiplier_claimed"] > 0  # the (broken) claim is still the accountant's
