"""The quality-table protocol: pool split by patient, repeated probe draws, bootstrap CI, detectable difference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mlip_fed.eval.protocol import (
    ProbeProtocol,
    auroc_rows,
    detectable_difference,
    evaluate_probe,
    evaluation_pool,
    gap_closed,
)


def test_auroc_rows_matches_sklearn_with_ties_and_single_class_rows() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(4, 50)), 1)  # rounded: ties
    targets = rng.integers(0, 2, size=(4, 50))
    targets[3] = 1  # one class only
    got = auroc_rows(scores, targets)
    for r in range(3):
        assert got[r] == pytest.approx(roc_auc_score(targets[r], scores[r]), abs=1e-12)
    assert math.isnan(got[3])


def _features(n: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels for 3 classes; feature j carries class j with strength ``signal``, plus 5 noise features."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((n, 14), float("nan"))
    y = (torch.rand(n, 3, generator=g) < 0.4).float()
    labels[:, [0, 2, 9]] = y
    x = torch.cat([signal * y + torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)], dim=1)
    return x, labels


def test_probe_summary_separates_signal_from_noise_and_ci_brackets_mean() -> None:
    protocol = ProbeProtocol(fractions=(0.05, 1.0), draws=3, bootstrap=200)
    xtr, ytr = _features(600, 2.0, 0)
    xte, yte = _features(400, 2.0, 1)
    strong = evaluate_probe(xtr, ytr, xte, yte, protocol)
    ntr, _ = _features(600, 0.0, 2)
    nte, _ = _features(400, 0.0, 3)
    noise = evaluate_probe(ntr, ytr, nte, yte, protocol)
    assert [s.fraction for s in strong] == [0.05, 1.0]
    assert strong[0].n_train == 30 and strong[1].n_train == 600
    assert len(strong[0].draws) == 3 and strong[0].std > 0  # different label subsets per draw
    assert strong[1].mean > 0.85 and abs(noise[1].mean - 0.5) < 0.06
    for s in strong + noise:
        assert s.ci_low <= s.mean <= s.ci_high
        assert s.ci_high - s.ci_low < 0.15
    assert len(strong[1].per_class) == 3  # only the three labelled classes are scored


def test_probe_refuses_pool_without_usable_classes() -> None:
    x, labels = torch.randn(20, 4), torch.full((20, 14), float("nan"))
    with pytest.raises(ValueError, match="evaluation pool is too small"):
        evaluate_probe(x, labels, x, labels, ProbeProtocol(bootstrap=0))


def test_protocol_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="fractions"):
        ProbeProtocol(fractions=(0.0,))
    with pytest.raises(ValueError, match="draws"):
        ProbeProtocol(draws=0)


@dataclass
class _Record:
    patient_id: str
    study_id: str


def test_evaluation_pool_splits_by_patient() -> None:
    records = [_Record(f"p{i // 2}", f"s{i}") for i in range(90)]
    fit, test = evaluation_pool(records, test_fraction=1 / 3, seed=0)
    assert len(fit) + len(test) == 90
    assert not {r.patient_id for r in fit} & {r.patient_id for r in test}
    assert len({r.patient_id for r in test}) == 15


def test_detectable_difference_and_gap_closed() -> None:
    assert detectable_difference(0.01, 0.01, 3, 3) == pytest.approx(2 * math.sqrt(2 * 0.0001 / 3))
    assert gap_closed(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert math.isnan(gap_closed(0.7, 0.5, 0.5))
    with pytest.raises(ValueError):
        detectable_difference(0.1, 0.1, 0, 3)
