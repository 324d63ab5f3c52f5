"""Sinkhorn-Knopp equipartition codes (SwAV/MGCA), computed batch-locally.

MGCA's published run is per-GPU batch-local (its distributed variant is never selected), so a
site-local Sinkhorn matches centralized practice.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes for [B, K] prototype scores: rows sum to 1; each prototype gets ~B/K mass in total.

    Alternates prototype-marginal (1/K) and sample-marginal (1/B) normalisations of exp(scores/eps),
    ending with the sample step so every row is an exact distribution.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects [B, K] scores, got shape {tuple(scores.shape)}")
    logits = scores.float() / epsilon
    q = torch.exp(logits - logits.max()).t()  # [K, B]; the max shift cancels in the normalisation
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t().to(scores.dtype)
