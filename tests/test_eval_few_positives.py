"""Evaluation on a site with too few positives: a warning and a partial table, never a failed run."""

from __future__ import annotations

import logging
import math

import torch
from test_eval_features import FakeEncoder, FakeTokenizer, ToyCXR

from mlip_fed.eval.config import EvalConfig
from mlip_fed.eval.linear_probe import run_linear_probe
from mlip_fed.eval.report import EvalResult, evaluate_all, to_markdown
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

CARDIO, FRACTURE = (CHEXPERT_CATEGORIES.index(n) for n in ("Cardiomegaly", "Fracture"))


def _split(n: int, seed: int, fracture_positives: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cardiomegaly = sign of feature 0 (plenty of both labels); Fracture has ``fracture_positives``; rest blank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.full((n, len(CHEXPERT_CATEGORIES)), math.nan)
    y[:, CARDIO] = (x[:, 0] > 0).float()
    y[:, FRACTURE] = 0.0
    y[:fracture_positives, FRACTURE] = 1.0
    return x, y


def test_classes_with_too_few_positives_are_skipped_with_a_warning(caplog) -> None:
    x_tr, y_tr = _split(60, seed=0, fracture_positives=2)
    x_te, y_te = _split(30, seed=1, fracture_positives=3)
    with caplog.at_level(logging.WARNING, logger="mlip_fed.eval.linear_probe"):
        lp = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(1.0,))
    assert lp.classes == ["Cardiomegaly"] and lp.not_computed is None
    assert "2 positives / 58 negatives" in lp.excluded["Fracture"]
    assert len(lp.excluded) == len(CHEXPERT_CATEGORIES) - 1
    assert "classes skipped" in caplog.text and "Fracture" in caplog.text

    result = EvalResult(n_train=60, n_test=30, seed=42, linear_probe=lp)
    assert "linear_probe/macro_auroc@1" in result.flat_metrics() and result.not_computed() == {}
    md = to_markdown(result)
    assert "| Fracture | skipped |" in md
    assert "- skipped Fracture: 2 positives / 58 negatives in the train split (needs 5 of each)" in md


def test_no_qualifying_class_reports_the_probe_as_not_computed(caplog) -> None:
    x_tr, y_tr = _split(8, seed=2, fracture_positives=1)
    y_tr[:, CARDIO] = 0.0
    y_tr[:2, CARDIO] = 1.0  # 2 positives: below min_count for every class
    x_te, y_te = _split(6, seed=3)
    with caplog.at_level(logging.WARNING, logger="mlip_fed.eval.linear_probe"):
        lp = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(0.1, 1.0))
    assert lp.fractions == [] and lp.classes == []
    assert lp.not_computed is not None and "no class has 5 positives" in lp.not_computed
    assert set(lp.excluded) == set(CHEXPERT_CATEGORIES)
    assert "linear probe not computed" in caplog.text

    result = EvalResult(n_train=8, n_test=6, seed=42, linear_probe=lp)
    assert not any(k.startswith("linear_probe/") for k in result.flat_metrics())
    assert result.not_computed() == {"linear_probe": lp.not_computed}
    md = to_markdown(result)
    assert f"Not computed: {lp.not_computed}." in md
    assert "| Cardiomegaly | skipped: 2 positives / 6 negatives" in md


def test_retrieval_is_still_reported_when_the_probe_cannot_run(caplog) -> None:
    torch.set_num_threads(1)
    cfg = EvalConfig.model_validate(
        {"zero_shot": {"enabled": False}, "linear_probe": {"fractions": [1.0], "min_count": 1000}}
    )
    with caplog.at_level(logging.WARNING):
        result = evaluate_all(
            FakeEncoder(), FakeTokenizer(), ToyCXR(16, with_mask=False), ToyCXR(8, seed=1, with_mask=False), cfg
        )
    assert result.linear_probe is not None and result.linear_probe.not_computed is not None
    assert result.retrieval is not None and "retrieval/i2t_R@1" in result.flat_metrics()
    assert "linear probe not computed" in caplog.text
