"""The quality tables' arithmetic: gap closed, seed statistics, detectable difference, gain ratio."""

from __future__ import annotations

import argparse

import pytest

from bench import ablation, fed_vs_central
from bench.quality import Pool, probe_mean, seed_stats


def _run(lp1: float, lp100: float) -> dict:
    probe = [{"fraction": f, "mean": v, "ci": [v - 0.01, v + 0.01]} for f, v in ((0.01, lp1), (0.1, lp1), (1.0, lp100))]
    return {"probe": probe, "metrics": {"retrieval/i2t_R@5": 0.1}, "train_seconds": 10.0}


def test_ablation_table_gap_closed_and_detectable_difference() -> None:
    args = argparse.Namespace(
        seeds=[0, 1], studies_per_site=10, steps=5, arch="resnet_tiny", difficulty="cpu", batch_size=32, lr=3e-4,
        supervised_lr=1e-3, draws=3, variants=["clip_only", "full"],
    )  # fmt: skip
    results = {
        "random_init": [_run(0.50, 0.55), _run(0.50, 0.55)],
        "supervised": [_run(0.80, 0.95), _run(0.80, 0.95)],
        "clip_only": [_run(0.60, 0.74), _run(0.62, 0.76)],  # 100 %: mean 0.75 -> gap (0.75-0.55)/(0.95-0.55) = 0.5
        "full": [_run(0.58, 0.70), _run(0.58, 0.72)],
    }
    pool = Pool(pretrain=[1] * 6, probe_train=[1] * 4, probe_test=[1] * 2)
    table = ablation.render(args, results, pool)
    clip_row = next(line for line in table.splitlines() if line.startswith("| CLIP-only"))
    assert (
        "| 0.610 ± 0.014 |" in clip_row and "| 0.37 | 0.50 |" in clip_row
    )  # (0.61-0.5)/(0.8-0.5), (0.75-0.55)/(0.95-0.55)
    assert "random-init encoder (reference) | 2 |" in table
    assert "1 %: 0.028" in table  # 2 * sqrt(0.0141^2 / 2 + 0.0141^2 / 2), the median seed std of the pretraining rows


def test_gain_ratio_and_seed_stats() -> None:
    result = {"random_init": _run(0.5, 0.5), "central": _run(0.6, 0.7), "federated": _run(0.55, 0.68)}
    assert abs(fed_vs_central.gain_ratio(result, 1.0) - 0.9) < 1e-9
    assert abs(fed_vs_central.gain_ratio(result, 0.01) - 0.5) < 1e-9
    flat = {"random_init": _run(0.5, 0.5), "central": _run(0.5, 0.5), "federated": _run(0.6, 0.6)}
    assert fed_vs_central.gain_ratio(flat, 1.0) != fed_vs_central.gain_ratio(flat, 1.0)  # NaN: no central gain
    assert probe_mean({"probe": []}, 1.0) != probe_mean({"probe": []}, 1.0)
    mean, std, n = seed_stats([0.5, 0.7, float("nan")])
    assert (round(mean, 6), round(std, 6), n) == (0.6, 0.141421, 2)


def test_site_identity_reference_scores_prevalence_differences_only() -> None:
    """One-hot hospital features rank a class whose prevalence differs by hospital, and nothing else."""
    import math
    import random
    from pathlib import Path

    from bench.quality import site_identity_probe
    from mlip_fed.data.records import StudyRecord
    from mlip_fed.eval.protocol import ProbeProtocol
    from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

    rng = random.Random(0)
    cardio, effusion = CHEXPERT_CATEGORIES.index("Cardiomegaly"), CHEXPERT_CATEGORIES.index("Pleural Effusion")

    def record(i: int) -> StudyRecord:
        site = "site_a" if i % 2 else "site_b"
        labels = [math.nan] * len(CHEXPERT_CATEGORIES)
        labels[cardio] = float(rng.random() < (0.8 if site == "site_a" else 0.2))  # prevalence differs by site
        labels[effusion] = float(rng.random() < 0.5)  # the same at both sites
        return StudyRecord(Path(f"{i}.png"), "report", f"p{i}", f"s{i}", site_id=site, labels=tuple(labels))

    pool = Pool(
        pretrain=[], probe_train=[record(i) for i in range(400)], probe_test=[record(i) for i in range(400, 800)]
    )
    result = site_identity_probe(pool, ProbeProtocol(fractions=(1.0,), draws=1, bootstrap=0))
    per_class = result["probe"][0]["per_class"]
    assert result["sites"] == ["site_a", "site_b"]
    assert per_class["Cardiomegaly"] > 0.75  # (0.8 vs 0.2 prevalence: AUROC = 0.8)
    assert abs(per_class["Pleural Effusion"] - 0.5) < 0.08


def test_a_reference_gain_inside_the_probe_noise_gives_no_ratio() -> None:
    """A ratio against a gain smaller than the probe's own CI half-width would be a ratio of noise."""
    import math

    from bench.quality import real_gain

    inside = {"random_init": _run(0.50, 0.50), "central": _run(0.505, 0.508), "federated": _run(0.52, 0.52)}
    assert math.isnan(fed_vs_central.gain_ratio(inside, 1.0))  # +0.008 with a CI half-width of 0.01
    assert math.isnan(real_gain(_run(0.49, 0.49), _run(0.50, 0.50), 1.0))  # a loss is no gain either
    assert real_gain(_run(0.60, 0.60), _run(0.50, 0.50), 1.0) == pytest.approx(0.1)
