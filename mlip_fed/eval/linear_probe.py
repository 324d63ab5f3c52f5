"""Linear probe: one logistic-regression head per CheXpert class on frozen pre-projection features.

Follows the CPU variant of the mlip-fed evaluation protocol: sklearn
``LogisticRegression`` (L2, lbfgs) on standardised features, label fractions 1/10/100 % of the train
split, AUROC on the test split. Conventions, stated once here:

* **Uncertainty policy.** ``u_ones``: uncertain (-1) → 1; ``u_zeros``: -1 → 0; ``mgca``: U-Ones for
  Atelectasis, Edema and Pleural Effusion and U-Zeros elsewhere (MGCA's CheXpert recipe). Blank (NaN,
  not mentioned) is always 0.
* **Label fractions** are drawn by *row* (study), not by patient: the probe only needs a train subset
  disjoint from the test split, which the split already guarantees; a patient's other studies may or
  may not be drawn. The subset is a fixed-seed permutation prefix, topped up so every class keeps at
  least one positive and one negative where the full train split has them.
* **AUROC** of a class whose test labels are all one value is undefined: it is reported as NaN and
  excluded from the macro average. A class that cannot be fitted (one label value in the train subset)
  is reported as NaN with the reason in ``skipped``.
* **Too few positives.** By default a class needs ``min_count`` positives and negatives in the train
  split; the others are listed in ``excluded`` with their counts and a warning is logged. When no class
  qualifies (a small or skewed site), the probe is *not computed* (``not_computed`` says why) instead of
  failing: the rest of the evaluation (retrieval, zero-shot) still stands.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer
from torch import Tensor

from mlip_fed.eval.config import UncertaintyPolicy
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

log = logging.getLogger(__name__)

#: A float that may be NaN ("undefined", e.g. AUROC on single-class labels). JSON has no NaN, so it is
#: written as ``null`` and read back as NaN: result files stay standard JSON and round-trip exactly.
NanFloat = Annotated[
    float,
    BeforeValidator(lambda v: math.nan if v is None else v),
    PlainSerializer(lambda v: None if math.isnan(v) else v, return_type=float | None, when_used="json"),
]

#: Classes MGCA maps uncertain labels to 1 for; all others go to 0 under the ``mgca`` policy.
MGCA_U_ONES: tuple[str, ...] = ("Atelectasis", "Edema", "Pleural Effusion")

#: The five CheXpert competition tasks used by most published linear-probe tables.
CHEXPERT_COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def binarize_labels(labels: Tensor, policy: UncertaintyPolicy = "u_ones") -> Tensor:
    """Map raw CheXpert labels [N, 14] (1 / 0 / -1 / NaN) to {0, 1} under an uncertainty policy."""
    if labels.ndim != 2 or labels.shape[1] != len(CHEXPERT_CATEGORIES):
        raise ValueError(f"labels must be [N, {len(CHEXPERT_CATEGORIES)}], got {tuple(labels.shape)}")
    known = {1.0, 0.0, -1.0}
    finite = labels[~torch.isnan(labels)]
    bad = [v for v in finite.unique().tolist() if v not in known]
    if bad:
        raise ValueError(f"labels contain values {bad}; expected 1, 0, -1 or NaN")
    if policy == "u_ones":
        uncertain_to = torch.ones(len(CHEXPERT_CATEGORIES))
    elif policy == "u_zeros":
        uncertain_to = torch.zeros(len(CHEXPERT_CATEGORIES))
    elif policy == "mgca":
        uncertain_to = torch.tensor([1.0 if c in MGCA_U_ONES else 0.0 for c in CHEXPERT_CATEGORIES])
    else:
        raise ValueError(f"unknown uncertainty policy {policy!r}; expected 'u_ones', 'u_zeros' or 'mgca'")
    out = torch.nan_to_num(labels.float(), nan=0.0)
    out = torch.where(out == -1.0, uncertain_to.expand_as(out), out)
    return out


def class_indices(classes: Sequence[str]) -> list[int]:
    """Column indices of ``classes`` in ``CHEXPERT_CATEGORIES``, with a clear error for a typo."""
    unknown = [c for c in classes if c not in CHEXPERT_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; expected names from {CHEXPERT_CATEGORIES}")
    return [CHEXPERT_CATEGORIES.index(c) for c in classes]


def default_classes(binary_labels: Tensor, min_count: int = 5) -> list[str]:
    """Classes with at least ``min_count`` positives *and* negatives in the (binarised) train split."""
    pos = binary_labels.sum(0)
    neg = binary_labels.shape[0] - pos
    return [c for i, c in enumerate(CHEXPERT_CATEGORIES) if pos[i] >= min_count and neg[i] >= min_count]


def class_exclusions(binary_labels: Tensor, min_count: int = 5) -> dict[str, str]:
    """Classes ``default_classes`` leaves out, each with its train-split counts (the reason it was left out)."""
    pos = binary_labels.sum(0)
    neg = binary_labels.shape[0] - pos
    return {
        c: f"{int(pos[i])} positives / {int(neg[i])} negatives in the train split (needs {min_count} of each)"
        for i, c in enumerate(CHEXPERT_CATEGORIES)
        if pos[i] < min_count or neg[i] < min_count
    }


def binary_auroc(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> float:
    """AUROC, or NaN when ``targets`` hold a single class (the metric is undefined there)."""
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"scores {s.shape} and targets {y.shape} differ in length")
    if np.unique(y).size < 2:
        return math.nan
    from sklearn.metrics import roc_auc_score  # lazy: mlip_fed.config reaches this module; a ClientApp never probes

    return float(roc_auc_score(y, s))


def macro_mean(values: Sequence[float]) -> float:
    """Mean over the finite entries; NaN when none is finite."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def label_fraction_subset(binary_labels: Tensor, fraction: float, seed: int = 42) -> Tensor:
    """Sorted row indices of a ``fraction`` subset of the train split, reproducible from ``seed``.

    The subset is the first ``ceil(fraction * N)`` rows of a seeded permutation; then, for each class
    missing positives (or negatives) in it, the first row of the permutation that supplies one is
    added. So the subset for a given seed is fixed, nested fractions are prefixes of the same order,
    and every class that *can* have both label values in the subset does.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = binary_labels.shape[0]
    if n == 0:
        raise ValueError("label_fraction_subset: empty train split")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    take = min(n, max(1, math.ceil(fraction * n)))
    in_subset = torch.zeros(n, dtype=torch.bool)
    in_subset[order[:take]] = True
    ordered = binary_labels[order]
    for c in range(binary_labels.shape[1]):
        for value in (1.0, 0.0):
            if bool((binary_labels[in_subset, c] == value).any()):
                continue
            hits = torch.nonzero(ordered[:, c] == value).flatten()
            if hits.numel():
                in_subset[order[hits[0]]] = True
    return torch.nonzero(in_subset).flatten()


class ProbeFractionResult(BaseModel):
    """Test AUROC of the probe trained on one label fraction."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    fraction: float
    n_train: int
    macro_auroc: NanFloat
    per_class: dict[str, NanFloat]
    #: Class → why it has no AUROC (untrainable subset or single-class test labels).
    skipped: dict[str, str] = {}
    C: float


class LinearProbeResult(BaseModel):
    """Linear-probe results over all label fractions."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    classes: list[str]
    policy: str
    seed: int
    fractions: list[ProbeFractionResult]
    #: Classes left out before fitting (too few positives or negatives in the train split) → why.
    excluded: dict[str, str] = {}
    #: Why no probe was fitted at all (no class qualified); None when the probe ran.
    not_computed: str | None = None


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale with train statistics: lbfgs converges far faster and C means the same for any encoder."""
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True)
    std[std < 1e-8] = 1.0
    return (train - mean) / std, (test - mean) / std


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, C: float, max_iter: int) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        # A probe that has not fully converged at max_iter is still a valid (slightly regularised) probe.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf.decision_function(x_test)


def _select_C(x: np.ndarray, y: np.ndarray, c_grid: Sequence[float], seed: int, max_iter: int) -> float:
    """One C for all classes, by mean AUROC on a seeded 20 % hold-out of the train subset."""
    n = x.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, n // 5)
    val, fit = order[:n_val], order[n_val:]
    best_c, best_score = float(c_grid[0]), -math.inf
    for C in c_grid:
        scores = []
        for c in range(y.shape[1]):
            if np.unique(y[fit, c]).size < 2:
                continue
            scores.append(binary_auroc(fit_predict(x[fit], y[fit, c], x[val], C, max_iter), y[val, c]))
        score = macro_mean(scores)
        if not math.isnan(score) and score > best_score:
            best_c, best_score = float(C), score
    return best_c


def run_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    classes: Sequence[str] | None = None,
    policy: UncertaintyPolicy = "u_ones",
    seed: int = 42,
    C: float = 1.0,
    c_grid: Sequence[float] | None = None,
    min_count: int = 5,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Fit per-class logistic heads on frozen features for each label fraction; AUROC on test.

    ``train_labels`` / ``test_labels`` are raw CheXpert labels [N, 14]. ``classes`` defaults to
    those with at least ``min_count`` positives and negatives in the train split. With ``c_grid``,
    C is chosen per fraction on a hold-out of the train subset (the reference's {0.01, 0.1, 1, 10});
    otherwise ``C`` is used as is, which is what the cheap per-round federated evaluation wants.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be [N, D]; got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels differ in number of rows")
    y_train_all = binarize_labels(train_labels, policy)
    y_test_all = binarize_labels(test_labels, policy)
    excluded: dict[str, str] = {}
    if classes is None:
        classes = default_classes(y_train_all, min_count)
        excluded = class_exclusions(y_train_all, min_count)
        if not classes:
            return _not_computed(excluded, y_train_all.shape[0], min_count, policy, seed)
        _warn_excluded(excluded, min_count)
    cols = class_indices(classes)
    x_train_all = train_features.double().numpy()
    x_test_raw = test_features.double().numpy()
    y_train_np = y_train_all[:, cols].numpy()
    y_test_np = y_test_all[:, cols].numpy()

    results = []
    for fraction in fractions:
        rows = label_fraction_subset(y_train_all[:, cols], fraction, seed).numpy()
        x_train, x_test = standardize(x_train_all[rows], x_test_raw)
        y_train = y_train_np[rows]
        chosen_c = _select_C(x_train, y_train, c_grid, seed, max_iter) if c_grid else C
        per_class: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for j, name in enumerate(classes):
            if np.unique(y_train[:, j]).size < 2:
                per_class[name] = math.nan
                skipped[name] = f"train subset has only label {int(y_train[0, j])}"
                continue
            if np.unique(y_test_np[:, j]).size < 2:
                per_class[name] = math.nan
                skipped[name] = f"test split has only label {int(y_test_np[0, j])}"
                continue
            scores = fit_predict(x_train, y_train[:, j], x_test, chosen_c, max_iter)
            per_class[name] = binary_auroc(scores, y_test_np[:, j])
        results.append(
            ProbeFractionResult(
                fraction=float(fraction),
                n_train=int(len(rows)),
                macro_auroc=macro_mean(list(per_class.values())),
                per_class=per_class,
                skipped=skipped,
                C=chosen_c,
            )
        )
    return LinearProbeResult(classes=list(classes), policy=policy, seed=seed, fractions=results, excluded=excluded)


def _not_computed(excluded: dict[str, str], n_train: int, min_count: int, policy: str, seed: int) -> LinearProbeResult:
    """No class qualifies: say so (warning and result) rather than fail the evaluation it is part of."""
    reason = f"no class has {min_count} positives and {min_count} negatives among the {n_train} train studies"
    log.warning("linear probe not computed: %s", reason)
    return LinearProbeResult(classes=[], policy=policy, seed=seed, fractions=[], excluded=excluded, not_computed=reason)


def _warn_excluded(excluded: dict[str, str], min_count: int) -> None:
    """One warning line: a probe over fewer classes than expected should not pass unnoticed."""
    if excluded:
        log.warning(
            "linear probe: %d of %d classes skipped (fewer than %d train positives or negatives): %s",
            len(excluded),
            len(CHEXPERT_CATEGORIES),
            min_count,
            ", ".join(excluded),
        )
