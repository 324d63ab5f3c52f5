"""DP release of prototype-bank statistics: noisy per-category sums of unit-norm embeddings and counts.

A per-category mean embedding leaks a patient's embedding when the category is small, and counts
leak case mix (docs/privacy.md "Prototype-bank release").

Sensitivity. The statistics are built per privacy unit (``federation.site.accumulate_bank`` with a unit key): a
unit's records positive for category c are first AVERAGED (mean of their unit-norm image embeddings, mean of their
text embeddings, norm <= 1 each) and the unit then adds that mean and a count of 1 to row c. So one unit moves each
row of each statistic by at most 1, and touches at most L_u = its number of distinct positive categories rows; its
L2 contribution is sqrt(L_u) per statistic. Summing records instead would be wrong: a patient with k follow-up
studies positive for c moves row c by k, i.e. the L2 bound is sqrt(sum_c k_c^2), not sqrt(L) (9 studies in one
category move one row by 9, where sqrt(14) = 3.7 was accounted per statistic). With L = the public ``prototype_contribution_bound``
(>= every L_u; L_u <= K, the number of categories, so L = K = 14 never refuses), Gaussian noise N(0, sigma^2) on
every coordinate of all three statistics is a Gaussian mechanism with effective noise multiplier
z = sigma / sqrt(3 L) (RDP(alpha) = alpha * 3L / (2 sigma^2)), charged at sample rate 1. Categories are suppressed
by thresholding the NOISY counts (thresholding the true counts would itself be a non-private release);
suppression is post-processing. Counts are therefore numbers of units (patients), not of studies.

The noise is a ``GaussianNoise`` (secret, see ``mlip_fed.privacy.randomness``); a plain ``torch.Generator`` is
accepted for tests only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlip_fed.privacy.randomness import GaussianNoise


@dataclass(frozen=True)
class PrototypeRelease:
    sum_image: torch.Tensor  # [K, d], zero rows where suppressed
    sum_text: torch.Tensor
    count: torch.Tensor  # [K] noisy counts, 0 where suppressed
    kept: torch.Tensor  # [K] bool
    noise_multiplier: float
    effective_noise_multiplier: float


def release_effective_noise(noise_multiplier: float, contribution_bound: int, num_statistics: int = 3) -> float:
    """z such that the joint release is a Gaussian mechanism with sensitivity 1 and noise multiplier z."""
    if noise_multiplier <= 0 or contribution_bound < 1:
        raise ValueError(
            f"need noise_multiplier > 0 and contribution_bound >= 1, got {noise_multiplier}, {contribution_bound}"
        )
    return noise_multiplier / math.sqrt(num_statistics * contribution_bound)


def contribution_count(labels: torch.Tensor, unit_ids: list[str]) -> int:
    """Largest number of distinct positive categories of one unit in this data (must be <= the public bound).

    Distinct categories, not (record, category) pairs: the bank averages a unit's records per category, so a unit
    adds at most 1 to each row it touches (module docstring)."""
    positive = labels == 1.0
    per_unit: dict[str, torch.Tensor] = {}
    for unit, row in zip(unit_ids, positive, strict=True):
        per_unit[unit] = per_unit[unit] | row if unit in per_unit else row.clone()
    return max((int(v.sum()) for v in per_unit.values()), default=0)


def release_prototypes(
    sum_image: torch.Tensor,
    sum_text: torch.Tensor,
    count: torch.Tensor,
    *,
    noise_multiplier: float,
    contribution_bound: int,
    threshold: float,
    noise: GaussianNoise | None = None,
    generator: torch.Generator | None = None,
    noise_applied_fraction: float = 1.0,
) -> PrototypeRelease:
    """Noise all three statistics, then suppress categories whose noisy count is below ``threshold``.

    ``noise`` is the site's secret ``GaussianNoise``; ``generator`` (tests only) draws plain reproducible noise.
    ``noise_applied_fraction`` (audit harness only, ``mlip_fed.privacy.release_canaries``; the site never passes it):
    < 1 draws the noise at ``noise_multiplier * fraction`` while the release still reports (and is accounted at)
    ``noise_multiplier``: a deliberately broken release that the canary audit must catch."""
    if (noise is None) == (generator is None):
        raise ValueError("release_prototypes: give exactly one of noise (a GaussianNoise) or generator (tests)")
    if not 0.0 <= noise_applied_fraction <= 1.0:
        raise ValueError(f"release: noise_applied_fraction must be in [0, 1], got {noise_applied_fraction}")
    k = count.shape[0]
    if sum_image.shape[0] != k or sum_text.shape != sum_image.shape:
        raise ValueError(
            f"release: sums {tuple(sum_image.shape)}/{tuple(sum_text.shape)} do not match {k} category counts"
        )
    z = release_effective_noise(noise_multiplier, contribution_bound)

    std = noise_multiplier * noise_applied_fraction  # noise_multiplier except in a deliberately broken audit

    def noisy(x: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            return x.float() + noise.sample(x.shape, std)
        return x.float() + torch.normal(0.0, std, size=x.shape, generator=generator)

    n_img, n_txt, n_cnt = noisy(sum_image), noisy(sum_text), noisy(count)
    kept = n_cnt >= threshold
    zero = kept.unsqueeze(1)
    return PrototypeRelease(
        sum_image=torch.where(zero, n_img, torch.zeros_like(n_img)),
        sum_text=torch.where(zero, n_txt, torch.zeros_like(n_txt)),
        count=torch.where(kept, n_cnt, torch.zeros_like(n_cnt)),
        kept=kept,
        noise_multiplier=noise_multiplier,
        effective_noise_multiplier=z,
    )
