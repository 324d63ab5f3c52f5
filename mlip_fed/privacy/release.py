"""DP release of prototype-bank statistics: noisy per-category sums of unit-norm embeddings and counts.

A per-category mean embedding leaks a patient's embedding when the category is small, and counts
leak case mix (reference/privacy.md §8). Each embedding is unit-norm and one privacy unit adds at
most L (record, category) pairs, so one unit moves the image sums, text sums and counts by at most
sqrt(L) each in L2. Gaussian noise N(0, sigma^2) on every coordinate of all three gives a Gaussian
mechanism with effective noise multiplier z = sigma / sqrt(3 L) (RDP(alpha) = alpha * 3L / (2 sigma^2)),
charged to the ledger at sample rate 1. Categories are suppressed by thresholding the NOISY counts
(thresholding the true counts would itself be a non-private release); suppression is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    """Largest number of (record, positive category) pairs of one unit in this data (must be <= the public bound)."""
    positive = (labels == 1.0).sum(dim=1).tolist()
    per_unit: dict[str, int] = {}
    for unit, n in zip(unit_ids, positive, strict=True):
        per_unit[unit] = per_unit.get(unit, 0) + int(n)
    return max(per_unit.values(), default=0)


def release_prototypes(
    sum_image: torch.Tensor,
    sum_text: torch.Tensor,
    count: torch.Tensor,
    *,
    noise_multiplier: float,
    contribution_bound: int,
    threshold: float,
    generator: torch.Generator,
) -> PrototypeRelease:
    """Noise all three statistics, then suppress categories whose noisy count is below ``threshold``."""
    k = count.shape[0]
    if sum_image.shape[0] != k or sum_text.shape != sum_image.shape:
        raise ValueError(
            f"release: sums {tuple(sum_image.shape)}/{tuple(sum_text.shape)} do not match {k} category counts"
        )
    z = release_effective_noise(noise_multiplier, contribution_bound)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x.float() + torch.normal(0.0, noise_multiplier, size=x.shape, generator=generator)

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
