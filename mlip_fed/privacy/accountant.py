"""Epsilon from the ledger: Opacus RDP and PRV accountants rebuilt from stored events.

The ledger stores every DP event as (effective noise multiplier, sample rate, steps); that list is a
sufficient statistic for both accountants (Opacus ``history``), so an accountant rebuilt from the
ledger after any restart equals one that lived through every step. The reported epsilon is the
larger of the two upper bounds by default (docs/privacy.md "Ledger, accountant and policy"); a site's ``privacy.accountant`` can choose
``rdp`` or ``prv`` instead (both are valid upper bounds; ``max`` is the conservative default). PRV can be unstable at
very large epsilon (Opacus #587); if it fails the report says so and uses RDP alone rather than hiding it.

PRV over a long history is the slow part (RDP is closed form), and a site round asks for the same history's epsilon
several times (policy check, charge, reply): PRV results are cached per (history, delta), so each distinct history is
computed once per process (``prv_evaluations`` counts the real computations).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant

from mlip_fed.privacy.opacus_logging import drop_opacus_root_handler

drop_opacus_root_handler()  # importing opacus added a root log handler: Flower's DEBUG lines on the console

#: Integer RDP orders only. Opacus and Google's dp-accounting agree exactly on integer orders of the subsampled
#: Gaussian, but not on fractional ones (dp-accounting 0.6 gives larger values, e.g. 1.357 vs 1.203 at order 1.5):
#: integer orders avoid relying on the looser of two fractional-order computations, at a small cost in tightness.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in [*range(2, 65), 80, 96, 128, 192, 256])


@dataclass(frozen=True)
class AccountedStep:
    """One entry of an accountant history: ``steps`` compositions of a Poisson-subsampled Gaussian."""

    noise_multiplier: float  # effective (already divided by the sensitivity factor)
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(
                f"invalid DP event: noise_multiplier={self.noise_multiplier} (> 0), sample_rate={self.sample_rate} "
                f"(in (0, 1]), steps={self.steps} (>= 0)"
            )


#: ``privacy.accountant`` values: which upper bound is the site's epsilon (budget checks, refusals, reports).
ACCOUNTANTS = ("max", "rdp", "prv")


@dataclass(frozen=True)
class EpsilonReport:
    delta: float
    rdp: float
    prv: float | None
    rdp_order: float | None
    prv_error: str | None = None
    accountant: str = "max"

    @property
    def epsilon(self) -> float:
        """The reported epsilon: ``max`` of the RDP and PRV upper bounds (default), or the one ``accountant`` names
        (``prv`` falls back to RDP when PRV was skipped or failed)."""
        if self.prv is None or self.accountant == "rdp":
            return self.rdp
        if self.accountant == "prv":
            return self.prv
        return max(self.rdp, self.prv)


def history(steps: Iterable[AccountedStep]) -> list[tuple[float, float, int]]:
    """Opacus' (noise multiplier, sample rate, steps) history, equal mechanisms merged into one entry.

    Composition does not depend on order, so merging every step with the same (sigma, q) is exact; it keeps the
    history as short as the number of distinct mechanisms (usually one per policy), so PRV over a long run (one
    entry per round before) costs the same as over a short one.
    """
    merged: dict[tuple[float, float], int] = {}
    for s in steps:
        if s.steps > 0:
            key = (float(s.noise_multiplier), float(s.sample_rate))
            merged[key] = merged.get(key, 0) + int(s.steps)
    return [(sigma, q, n) for (sigma, q), n in merged.items()]


def rdp_accountant(steps: Iterable[AccountedStep]) -> RDPAccountant:
    acc = RDPAccountant()
    acc.history = history(steps)
    return acc


def prv_accountant(steps: Iterable[AccountedStep]) -> PRVAccountant:
    acc = PRVAccountant()
    acc.history = history(steps)
    return acc


def rdp_epsilon(steps: Sequence[AccountedStep], delta: float) -> tuple[float, float | None]:
    hist = history(steps)
    if not hist:
        return 0.0, None
    acc = RDPAccountant()
    acc.history = hist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": reported via rdp_order instead
        eps, order = acc.get_privacy_spent(delta=delta, alphas=list(RDP_ORDERS))
    return float(eps), float(order)


#: Above this RDP epsilon PRV is skipped: it can take minutes or fail there (Opacus #587), and the reported
#: max(RDP, PRV) is >= RDP anyway, so the decision "over budget" cannot change.
PRV_SKIP_ABOVE = 100.0

#: Real PRV computations in this process (cache misses of ``compute_epsilon``): for tests and diagnostics.
prv_evaluations = 0


@functools.lru_cache(maxsize=256)
def _prv_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """PRV epsilon of an accountant history; cached, since a round asks for the same history several times."""
    global prv_evaluations
    prv_evaluations += 1
    acc = PRVAccountant()
    acc.history = list(hist)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log(1 - q) at q = 1 (unsampled releases)
        return float(acc.get_epsilon(delta=delta))


def clear_cache() -> None:
    """Forget cached PRV results (tests)."""
    _prv_epsilon.cache_clear()


def prv_needed(accountant: str) -> bool:
    """Whether the site's accountant uses PRV at all (``rdp`` does not: its budget path never computes PRV)."""
    return accountant != "rdp"


def compute_epsilon(
    steps: Sequence[AccountedStep],
    delta: float,
    *,
    with_prv: bool | None = None,
    skip_prv_above: float = PRV_SKIP_ABOVE,
    accountant: str = "max",
) -> EpsilonReport:
    """Epsilon at ``delta`` of the composition of ``steps``; ``accountant`` says which bound ``.epsilon`` is.

    ``with_prv=None``: PRV is computed unless ``accountant="rdp"`` (pass True to report it for information anyway).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if with_prv is None:
        with_prv = prv_needed(accountant)
    rdp, order = rdp_epsilon(steps, delta)
    prv: float | None = None
    error: str | None = None
    hist = history(steps)
    if with_prv and hist and rdp > skip_prv_above:
        error = f"PRV skipped: RDP epsilon {rdp:.3g} > {skip_prv_above:g} already (reported epsilon >= RDP)"
    elif with_prv and hist:
        try:
            prv = _prv_epsilon(tuple(hist), float(delta))
            if not math.isfinite(prv):
                prv, error = None, "PRV returned a non-finite epsilon"
        except Exception as err:  # PRV has known numerical failures at large epsilon; RDP still bounds it
            error = f"PRV accountant failed ({type(err).__name__}: {err}); epsilon from RDP only"
    elif not hist:
        prv = 0.0
    return EpsilonReport(delta=delta, rdp=rdp, prv=prv, rdp_order=order, prv_error=error, accountant=accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    sensitivity_factor: float = 2.0,
    prior: Sequence[AccountedStep] = (),
    tolerance: float = 1e-3,
) -> float:
    """Smallest sigma (units of C) such that ``prior`` + ``steps`` steps at (sigma / factor, q) stays <= target (RDP).

    Calibrate once for the whole schedule (all rounds' steps), never per round: per-round calibration would let the total overshoot the budget.
    """
    if steps < 1:
        raise ValueError(f"calibrate_noise_multiplier: steps must be >= 1, got {steps}")

    def eps(sigma: float) -> float:
        planned = [*prior, AccountedStep(sigma / sensitivity_factor, sample_rate, steps)]
        return rdp_epsilon(planned, delta)[0]

    low, high = 1e-2, 1.0
    while eps(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise ValueError(
                f"cannot reach epsilon={target_epsilon} at delta={delta} with q={sample_rate}, {steps} steps "
                f"(prior spend too large?)"
            )
    while high - low > tolerance * high:
        mid = 0.5 * (low + high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
