"""The linear-probe protocol that quality tables are built on: an evaluation pool, repeated draws, bootstrap CIs.

Why a protocol of its own: with 1 % of a few hundred studies (7-14 labelled images) and a test split of
~180 studies, the noise of a single probe is larger than the differences between pretraining methods.
Here:

* the **evaluation pool** is a set of studies from patients the encoder never saw in pretraining, split
  once by patient into probe-train and probe-test (``evaluation_pool``);
* each label fraction is drawn ``draws`` times (nested, seeded subsets as ``label_fraction_subset`` makes
  them) and the probe's macro AUROC is reported as mean ± std over draws;
* a percentile **bootstrap CI** over probe-test studies (the same resampled rows for every draw) gives the
  uncertainty that comes from the finite test set;
* ``detectable_difference`` turns the spread over pretraining seeds into the smallest difference between
  two methods the protocol can tell apart (twice the standard error of the difference of two means).

Only the probe-test part of the pool is ever scored for a table; nothing is tuned on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from torch import Tensor

from mlip_fed.eval.config import UncertaintyPolicy
from mlip_fed.eval.linear_probe import (
    binarize_labels,
    class_indices,
    default_classes,
    fit_predict,
    label_fraction_subset,
    standardize,
)

T = TypeVar("T")


@dataclass(frozen=True)
class ProbeProtocol:
    """How the probe is run: label fractions, draws per fraction, bootstrap resamples, probe settings."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    draws: int = 3
    bootstrap: int = 1000
    seed: int = 42
    C: float = 1.0
    policy: UncertaintyPolicy = "u_ones"
    min_count: int = 5
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"ProbeProtocol.fractions must be non-empty values in (0, 1], got {self.fractions}")
        if self.draws < 1:
            raise ValueError(f"ProbeProtocol.draws must be >= 1, got {self.draws}")
        if self.bootstrap < 0:
            raise ValueError(f"ProbeProtocol.bootstrap must be >= 0, got {self.bootstrap}")


@dataclass
class FractionSummary:
    """The probe at one label fraction: per-draw macro AUROC, their mean ± std, the bootstrap CI of the mean."""

    fraction: float
    n_train: int
    draws: list[float]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    per_class: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "n_train": self.n_train,
            "draws": self.draws,
            "mean": self.mean,
            "std": self.std,
            "ci": [self.ci_low, self.ci_high],
            "per_class": self.per_class,
        }


def evaluation_pool(records: Sequence[T], test_fraction: float = 1 / 3, seed: int = 0) -> tuple[list[T], list[T]]:
    """(probe-train, probe-test) of held-out studies, split by patient (records need ``patient_id``)."""
    from mlip_fed.data.partition import split_patients

    return split_patients(records, test_fraction, seed)  # type: ignore[arg-type,return-value]


def auroc_rows(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` [R, N] against the matching row of binary ``targets`` [R, N].

    Mann-Whitney form with average ranks for ties (what ``roc_auc_score`` computes); NaN for a row whose
    targets hold one class. Vectorised, so a thousand bootstrap resamples cost one ranking.
    """
    from scipy.stats import rankdata

    scores, targets = np.atleast_2d(scores), np.atleast_2d(targets).astype(bool)
    ranks = rankdata(scores, axis=1)
    n_pos = targets.sum(axis=1)
    n_neg = targets.shape[1] - n_pos
    rank_sum = np.where(targets, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def evaluate_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    protocol: ProbeProtocol | None = None,
    classes: Sequence[str] | None = None,
) -> list[FractionSummary]:
    """Probe each label fraction ``protocol.draws`` times; mean ± std over draws and a bootstrap CI per fraction.

    Classes: ``classes``, or those with ``min_count`` positives and negatives in probe-train and both label
    values in probe-test (so every draw and every resample averages over the same classes).
    """
    protocol = protocol or ProbeProtocol()
    y_train_all = binarize_labels(train_labels, protocol.policy)
    y_test_all = binarize_labels(test_labels, protocol.policy)
    if classes is None:
        both = (y_test_all.sum(0) > 0) & (y_test_all.sum(0) < y_test_all.shape[0])
        classes = [c for c in default_classes(y_train_all, protocol.min_count) if bool(both[class_indices([c])[0]])]
    if not classes:
        raise ValueError(
            f"evaluate_probe: no class has {protocol.min_count} positives and negatives in probe-train and both "
            "label values in probe-test; the evaluation pool is too small"
        )
    cols = class_indices(classes)
    x_train_all = train_features.double().numpy()
    x_test_raw = test_features.double().numpy()
    y_train = y_train_all[:, cols].numpy()
    y_test = y_test_all[:, cols].numpy()
    rng = np.random.default_rng(protocol.seed)
    n_test = y_test.shape[0]
    resamples = rng.integers(0, n_test, size=(protocol.bootstrap, n_test)) if protocol.bootstrap else None

    summaries = []
    for fraction in protocol.fractions:
        draw_scores: list[np.ndarray] = []  # [n_test, classes] per draw
        n_train = 0
        for draw in range(protocol.draws):
            rows = label_fraction_subset(y_train_all[:, cols], fraction, protocol.seed + draw).numpy()
            n_train = len(rows)
            x_fit, x_test = standardize(x_train_all[rows], x_test_raw)
            scores = np.full((n_test, len(cols)), np.nan)
            for j in range(len(cols)):
                if np.unique(y_train[rows, j]).size == 2:
                    scores[:, j] = fit_predict(x_fit, y_train[rows, j], x_test, protocol.C, protocol.max_iter)
            draw_scores.append(scores)
        per_draw_class = np.array([auroc_rows(s.T, y_test.T) for s in draw_scores])  # [draws, classes]
        draws = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in per_draw_class]
        ci_low = ci_high = math.nan
        if resamples is not None:
            boot = np.zeros((protocol.draws, protocol.bootstrap))
            for d, scores in enumerate(draw_scores):
                per_class = np.stack(
                    [auroc_rows(scores[resamples, j], y_test[resamples, j]) for j in range(len(cols))], axis=1
                )  # [bootstrap, classes]
                boot[d] = np.nanmean(per_class, axis=1)
            ci_low, ci_high = (float(v) for v in np.nanpercentile(boot.mean(axis=0), [2.5, 97.5]))
        summaries.append(
            FractionSummary(
                fraction=float(fraction),
                n_train=n_train,
                draws=draws,
                mean=float(np.mean(draws)),
                std=float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0,
                ci_low=ci_low,
                ci_high=ci_high,
                per_class={c: float(np.nanmean(per_draw_class[:, j])) for j, c in enumerate(classes)},
            )
        )
    return summaries


def detectable_difference(std_a: float, std_b: float, n_a: int, n_b: int) -> float:
    """Smallest difference of two means (over ``n_a`` and ``n_b`` seeds) larger than twice its standard error."""
    if n_a < 1 or n_b < 1:
        raise ValueError(f"detectable_difference needs at least one seed per arm, got {n_a} and {n_b}")
    return 2.0 * math.sqrt(std_a**2 / n_a + std_b**2 / n_b)


def gap_closed(method: float, random_init: float, supervised: float) -> float:
    """(method − random) / (supervised − random): the share of the supervised ceiling's gain a method reaches."""
    span = supervised - random_init
    if not math.isfinite(span) or span <= 0:
        return math.nan
    return (method - random_init) / span
