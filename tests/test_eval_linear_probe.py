"""Linear probe: separable vs random labels, uncertainty policy, label-fraction subsets, NaN handling."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_fed.eval.linear_probe import (
    binarize_labels,
    binary_auroc,
    default_classes,
    label_fraction_subset,
    run_linear_probe,
)
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

C = len(CHEXPERT_CATEGORIES)
CARDIO, EDEMA, FRACTURE = (CHEXPERT_CATEGORIES.index(n) for n in ("Cardiomegaly", "Edema", "Fracture"))


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, 8]; Cardiomegaly = sign of feature 0 (separable), Edema = coin flip (unlearnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.full((n, C), math.nan)
    y[:, CARDIO] = (x[:, 0] > 0).float()
    y[:, EDEMA] = (torch.rand(n, generator=g) < 0.5).float()
    return x, y


def test_separable_class_near_perfect_and_random_class_near_chance() -> None:
    x_tr, y_tr = _split(300, seed=0)
    x_te, y_te = _split(400, seed=1)
    res = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(0.1, 1.0), classes=["Cardiomegaly", "Edema"])
    for fr in res.fractions:
        assert fr.per_class["Cardiomegaly"] > 0.95
        assert abs(fr.per_class["Edema"] - 0.5) < 0.1
        assert fr.macro_auroc == pytest.approx((fr.per_class["Cardiomegaly"] + fr.per_class["Edema"]) / 2)
    assert [fr.n_train for fr in res.fractions] == [30, 300]
    again = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(0.1, 1.0), classes=["Cardiomegaly", "Edema"])
    assert again == res


def test_default_classes_and_single_class_test_is_nan_and_excluded() -> None:
    x_tr, y_tr = _split(100, seed=2)
    x_te, y_te = _split(50, seed=3)
    assert default_classes(binarize_labels(y_tr)) == ["Cardiomegaly", "Edema"]
    y_tr[:10, FRACTURE] = 1.0
    y_te[:, FRACTURE] = 0.0  # no positive in test → AUROC undefined
    res = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(1.0,), classes=["Cardiomegaly", "Fracture"])
    fr = res.fractions[0]
    assert math.isnan(fr.per_class["Fracture"]) and "test split" in fr.skipped["Fracture"]
    assert fr.macro_auroc == fr.per_class["Cardiomegaly"]


def test_c_grid_selects_from_grid() -> None:
    x_tr, y_tr = _split(120, seed=4)
    x_te, y_te = _split(60, seed=5)
    res = run_linear_probe(x_tr, y_tr, x_te, y_te, fractions=(1.0,), classes=["Cardiomegaly"], c_grid=(0.01, 1.0))
    assert res.fractions[0].C in (0.01, 1.0)


def test_uncertainty_policies() -> None:
    raw = torch.full((1, C), math.nan)
    raw[0, CARDIO], raw[0, EDEMA], raw[0, FRACTURE] = -1.0, -1.0, 1.0
    ones, zeros, mgca = (binarize_labels(raw, p)[0] for p in ("u_ones", "u_zeros", "mgca"))
    assert (ones[CARDIO], ones[EDEMA], ones[FRACTURE]) == (1.0, 1.0, 1.0)
    assert (zeros[CARDIO], zeros[EDEMA]) == (0.0, 0.0)
    assert (mgca[CARDIO], mgca[EDEMA]) == (0.0, 1.0)  # MGCA: U-Ones for Edema, U-Zeros for Cardiomegaly
    assert ones.sum() == 3  # blanks → 0
    with pytest.raises(ValueError, match="values"):
        binarize_labels(torch.full((1, C), 2.0))
    with pytest.raises(ValueError, match="policy"):
        binarize_labels(raw, "u_maybe")  # type: ignore[arg-type]


def test_label_fraction_subset_is_deterministic_and_keeps_both_labels() -> None:
    y = torch.zeros(1000, 3)
    y[:500, 0] = 1.0
    y[[7, 900], 1] = 1.0  # rare class: 2 positives in 1000
    # class 2: never positive → cannot be helped
    a = label_fraction_subset(y, 0.01, seed=42)
    assert torch.equal(a, label_fraction_subset(y, 0.01, seed=42))
    assert not torch.equal(a, label_fraction_subset(y, 0.01, seed=7))
    assert 10 <= len(a) <= 12 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == len(a)
    sub = y[a]
    assert sub[:, 0].min() == 0 and sub[:, 0].max() == 1
    assert sub[:, 1].max() == 1 and sub[:, 1].min() == 0
    assert torch.equal(label_fraction_subset(y, 1.0), torch.arange(1000))
    # Nested fractions come from the same permutation prefix.
    assert set(label_fraction_subset(y, 0.1).tolist()) >= set(label_fraction_subset(y, 0.05).tolist()) - {7, 900}
    with pytest.raises(ValueError, match="fraction"):
        label_fraction_subset(y, 0.0)


def test_binary_auroc_hand_example() -> None:
    assert binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert math.isnan(binary_auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
