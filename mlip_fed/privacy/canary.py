"""One-run empirical privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023, arXiv 2305.08846).

m canaries are each included in training with probability 1/2; after training the auditor scores
them, guesses "in" for the k+ highest and "out" for the k- lowest scores and counts v correct of
r guesses. If the mechanism is (eps, delta)-DP, that many correct guesses is unlikely; the largest
eps still consistent at significance p is a lower bound on the true epsilon (docs/privacy.md,
"Empirical one-run audit"). It is a bug detector, not a certificate: a bound far above the claimed epsilon means the
implementation leaks more than the accountant says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def one_run_p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """p(eps, delta) = min(1, beta + alpha * 2 m delta) for v correct out of r guesses on m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = math.exp(epsilon) / (1 + math.exp(epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0:
        # P[v - i <= Binomial < v] = cdf(v - 1) - cdf(v - i - 1), for i = 1..v at once
        i = np.arange(1, v + 1)
        mass = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
        alpha = float(np.max(mass / i))
    return min(1.0, beta + alpha * 2 * m * delta)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, significance: float = 0.05, tolerance: float = 1e-6
) -> float:
    """sup{eps >= 0 : p(eps, delta) <= significance}, by bisection (p decreases in eps); 0 if none."""
    if one_run_p_value(0.0, delta, m, r, v) > significance:
        return 0.0  # not even eps = 0 is rejected: no evidence of leakage
    low = 0.0
    high = 1.0
    while one_run_p_value(high, delta, m, r, v) <= significance:
        low, high = high, high * 2
        if high > 1e3:
            return low
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        if one_run_p_value(mid, delta, m, r, v) <= significance:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class CanaryAudit:
    m: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    significance: float
    delta: float


def audit_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    k_plus: int,
    k_minus: int = 0,
    delta: float = 1e-5,
    significance: float = 0.05,
) -> CanaryAudit:
    """Guess "in" for the top ``k_plus`` scores, "out" for the bottom ``k_minus``; bound epsilon.

    Fix k+/k- before looking at the scores (or correct for multiple testing): choosing them after the fact
    inflates the bound.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = s.shape[0]
    if inc.shape != (m,) or k_plus + k_minus > m or k_plus < 0 or k_minus < 0:
        raise ValueError(f"audit_scores: {m} scores, {inc.shape} inclusion bits, k+={k_plus}, k-={k_minus}")
    order = np.argsort(-s, kind="stable")
    correct = int(inc[order[:k_plus]].sum()) + int((~inc[order[m - k_minus :]]).sum() if k_minus else 0)
    r = k_plus + k_minus
    eps = epsilon_lower_bound(m, r, correct, delta, significance)
    return CanaryAudit(m, r, correct, eps, significance, delta)
