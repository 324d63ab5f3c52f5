"""A site's policy check before it trains a round: what would this round cost, and is it allowed?

The site decides, not the server (docs/architecture.md, invariant 3): the check reads the site's own policy and
ledger and returns a ``Refusal`` whose reason is sent back to the server and logged there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlip_fed.config import PrivacyPolicy
from mlip_fed.privacy.accountant import PRV_SKIP_ABOVE, AccountedStep, compute_epsilon


@dataclass(frozen=True)
class Refusal:
    """Why a site will not do the requested work. ``code``: delta | noise | budget | mechanism."""

    code: str
    reason: str
    epsilon_spent: float | None = None
    epsilon_after: float | None = None

    def __str__(self) -> str:
        return f"refused ({self.code}): {self.reason}"


def check_round(
    policy: PrivacyPolicy,
    spent: Sequence[AccountedStep],
    planned: Sequence[AccountedStep],
    *,
    num_records: int,
    noise_multiplier: float | None,
) -> Refusal | None:
    """None if the planned events fit the policy on top of what the ledger already holds, else the reason."""
    if policy.mechanism == "none":
        return None
    if num_records < 1:
        return Refusal("delta", f"the site has {num_records} records; nothing can be trained")
    if policy.delta > 1.0 / num_records:
        return Refusal(
            "delta",
            f"privacy.delta={policy.delta:g} exceeds 1/N = {1.0 / num_records:.3g} for N={num_records} records; "
            "a delta that large lets the mechanism reveal a whole record",
        )
    if noise_multiplier is None or noise_multiplier < policy.min_noise_multiplier:
        return Refusal(
            "noise",
            f"noise multiplier {noise_multiplier} is below the site's privacy.min_noise_multiplier="
            f"{policy.min_noise_multiplier}",
        )
    assert policy.epsilon_budget is not None  # enforced by PrivacyPolicy
    after = compute_epsilon(
        [*spent, *planned],
        policy.delta,
        skip_prv_above=budget_prv_skip(policy),
        accountant=policy.accountant,
    ).epsilon
    if after > policy.epsilon_budget:
        # "before" only for the message: computing it on every allowed round would be one more PRV over the history
        before = compute_epsilon(spent, policy.delta, accountant=policy.accountant).epsilon
        return Refusal(
            "budget",
            f"this round would raise epsilon from {before:.3f} to {after:.3f} at delta={policy.delta:g}, above the "
            f"site's privacy.epsilon_budget={policy.epsilon_budget:g}",
            epsilon_spent=before,
            epsilon_after=after,
        )
    return None


def budget_prv_skip(policy: PrivacyPolicy) -> float:
    """Above which RDP epsilon a budget check may skip PRV: the budget itself when the reported epsilon is
    max(RDP, PRV) (it is >= RDP > budget either way); with ``accountant="prv"`` PRV decides, so only the
    accountant's numerical limit applies."""
    assert policy.epsilon_budget is not None
    return policy.epsilon_budget if policy.accountant in ("max", "rdp") else PRV_SKIP_ABOVE
