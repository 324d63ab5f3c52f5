"""The façade a site's round calls: check the policy, train privately, charge the ledger, release the bank.

Usage from the federation (one object per site process; the ledger file outlives it):

    sp = SitePrivacy(policy, ledger_path, num_records=N, run_id=run_id, site="hospital-a")
    refusal = sp.plan_round(rnd, steps=T, sample_rate=q)      # before any training
    if refusal: reply with str(refusal)
    loader = sp.poisson_loader(dataset, collator, patient_ids, q)
    grad = sp.gradient_fn(model)                              # LocalTrainer(..., gradient_fn=grad)
    ... trainer.fit(loader, epochs) ...
    sp.record_training(rnd, steps=grad.steps, sample_rate=q)  # before the reply leaves the site
    bank, L_u = accumulate_bank(model, loader, device, "patient_id")  # per-unit category means (federation.site)
    release = sp.release_bank(bank, rnd, observed_contributions=L_u)  # noisy sums/counts, charged
    grad.close()

Randomness: every DP draw (gradient noise, Poisson sample, prototype-release noise) is seeded from OS entropy in
this object, never from the ``seed`` the caller passes (the site derives it from the experiment seed, site id, run id
and round: all known to the server). Only ``privacy.insecure_reproducible_noise`` (debugging) uses that public seed;
it warns on every construction (= every round) and marks the ledger events ``noise_source: insecure_reproducible``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mlip_fed.config import PrivacyPolicy
from mlip_fed.privacy.accountant import AccountedStep, EpsilonReport, calibrate_noise_multiplier, compute_epsilon
from mlip_fed.privacy.engine import (
    SENSITIVITY_FACTOR,
    BucketedClippingGradient,
    ExtraUnitGradients,
    PoissonLoader,
    effective_noise_multiplier,
)
from mlip_fed.privacy.ledger import LedgerEvent, PrivacyLedger
from mlip_fed.privacy.policy import Refusal, budget_prv_skip, check_round
from mlip_fed.privacy.randomness import (
    INSECURE_SOURCE,
    INSECURE_WARNING,
    SECRET_SOURCE,
    GaussianNoise,
    public_seed,
    secret_seed,
)
from mlip_fed.privacy.release import PrototypeRelease, release_effective_noise, release_prototypes
from mlip_fed.privacy.request_claims import RequestClaims

logger = logging.getLogger("mlip_fed.privacy")


class PrivacyRefused(RuntimeError):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class SitePrivacy:
    def __init__(
        self,
        policy: PrivacyPolicy,
        ledger_path: str | Path,
        num_records: int,
        run_id: str,
        *,
        site: str = "site",
        seed: int | None = None,
    ) -> None:
        """``seed``: the public seed used ONLY under ``privacy.insecure_reproducible_noise``; otherwise ignored."""
        self.policy = policy
        self.num_records = num_records
        self.run_id = run_id
        self.insecure = policy.insecure_reproducible_noise
        #: Root of this round's DP draws: OS entropy, or the caller's public seed under the debug switch.
        self.seed = (seed or 0) if self.insecure else secret_seed()
        self.noise_source = INSECURE_SOURCE if self.insecure else SECRET_SOURCE
        self.secure_mode = policy.secure_mode and not self.insecure
        self.ledger = PrivacyLedger(ledger_path)
        self.claims = RequestClaims(self.ledger)
        self.noise_multiplier = policy.noise_multiplier
        #: The history ``plan_round`` found within budget (ledger + the round's planned events): charging a prefix of
        #: it needs no second accountant run (epsilon only grows with more events).
        self._approved: list[AccountedStep] | None = None
        self._release_noise = GaussianNoise(
            public_seed("release", self.seed, run_id) if self.insecure else None, secure_mode=policy.secure_mode
        )
        self.ledger.set_meta("site", site)
        self.ledger.set_meta("num_records", num_records)
        self.ledger.set_meta("policy", policy.model_dump(mode="json"))
        self.ledger.set_meta("secure_mode", self.secure_mode)
        if self.insecure:  # sticky: a ledger that ever held a reproducible-noise event says so forever
            logger.warning("[%s] run %s: %s", site, run_id, INSECURE_WARNING)
            self.ledger.set_meta("insecure_reproducible_noise", True)

    @property
    def enabled(self) -> bool:
        return self.policy.mechanism != "none"

    # ------------------------------------------------------------------ planning
    def calibrate(self, total_steps: int, sample_rate: float, releases: int = 0) -> float:
        """Set sigma once for the whole schedule (all rounds' steps and ``releases`` prototype releases)."""
        self._require_dp()
        assert self.policy.epsilon_budget is not None
        spent = list(self.ledger.accounted_steps())
        release_steps = [self._release_step()] * releases if releases and self.policy.release_prototypes else []
        prior = spent + release_steps
        try:
            sigma = calibrate_noise_multiplier(
                self.policy.epsilon_budget,
                self.policy.delta,
                sample_rate,
                total_steps,
                sensitivity_factor=SENSITIVITY_FACTOR[self.policy.mechanism],
                prior=prior,
            )
        except ValueError as err:  # say what ate the budget: earlier runs, or this run's prototype releases
            acc = self.policy.accountant
            spent_eps = compute_epsilon(spent, self.policy.delta, accountant=acc).epsilon if spent else 0.0
            release_eps = (
                compute_epsilon(release_steps, self.policy.delta, accountant=acc).epsilon if release_steps else 0.0
            )
            raise ValueError(
                f"{err}: epsilon_budget={self.policy.epsilon_budget} cannot cover the plan. Already spent in the "
                f"ledger: epsilon {spent_eps:.3g}; this run's {len(release_steps)} prototype release(s) alone: "
                f"epsilon {release_eps:.3g} (privacy.prototype_noise_multiplier="
                f"{self.policy.prototype_noise_multiplier}, prototype_contribution_bound="
                f"{self.policy.prototype_contribution_bound}; configs/privacy/bucketed.yaml uses 20 and 14). "
                "Raise the prototype noise, set release_prototypes: false, plan fewer rounds, or raise the budget."
            ) from err
        self.noise_multiplier = max(sigma, self.policy.min_noise_multiplier)
        return self.noise_multiplier

    def _training_event(self, rnd: int, steps: int, sample_rate: float) -> LedgerEvent:
        sigma = self._sigma()
        mech = self.policy.mechanism
        return LedgerEvent(
            run_id=self.run_id,
            round=rnd,
            kind="train",
            mechanism=mech,
            noise_multiplier=sigma,
            effective_noise_multiplier=effective_noise_multiplier(mech, sigma),
            sample_rate=sample_rate,
            steps=steps,
            details={
                "clipping": "bucketed" if mech == "bucketed" else f"per_{self.policy.privacy_unit}",
                "loss": "group_masked" if mech == "bucketed" else "decomposable",
                "num_buckets": self.policy.num_buckets,
                "clipping_norm": self.policy.clipping_norm,
                "unit": self.policy.privacy_unit,
                "poisson_sampling": True,
                "secure_mode": self.secure_mode,
                "noise_source": self.noise_source,
            },
        )

    def _release_step(self) -> AccountedStep:
        z = release_effective_noise(self.policy.prototype_noise_multiplier, self.policy.prototype_contribution_bound)
        return AccountedStep(z, 1.0, 1)

    def plan_round(self, rnd: int, steps: int, sample_rate: float) -> Refusal | None:
        """What this round (training + the prototype release, if the policy releases) would cost; None if allowed."""
        if not self.enabled:
            return None
        planned = [self._training_event(rnd, steps, sample_rate).step()] if self.noise_multiplier else []
        if self.policy.release_prototypes:
            planned.append(self._release_step())
        spent = self.ledger.accounted_steps()
        refusal = check_round(
            self.policy,
            spent,
            planned,
            num_records=self.num_records,
            noise_multiplier=self.noise_multiplier,
        )
        self._approved = None if refusal is not None or not planned else [*spent, *planned]
        return refusal

    # ------------------------------------------------------------------ training
    def gradient_fn(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Any] | None = None,
        *,
        extra_unit_gradients: ExtraUnitGradients | None = None,
    ) -> BucketedClippingGradient:
        """The DP gradient: secret noise, clipping per bucket (bucketed) or per privacy unit (decomposable).

        ``extra_unit_gradients``: the one-run audit's canary gradients (``privacy.canary_run``); never at a site."""
        self._require_dp()
        return BucketedClippingGradient(
            model,
            noise_multiplier=self._sigma(),
            clipping_norm=self.policy.clipping_norm,
            num_buckets=self.policy.num_buckets,
            mode=self.policy.mechanism,  # type: ignore[arg-type]
            seed=public_seed(self.seed, self.run_id) if self.insecure else None,
            secure_mode=self.policy.secure_mode,
            unit=self.policy.privacy_unit,
            loss_fn=loss_fn,
            extra_unit_gradients=extra_unit_gradients,
        )

    def poisson_loader(
        self, dataset: Any, collate_fn: Any, patient_ids: list[str], sample_rate: float, **kwargs: Any
    ) -> PoissonLoader:
        return PoissonLoader(
            dataset,
            collate_fn,
            patient_ids,
            sample_rate,
            num_buckets=self.policy.num_buckets,
            unit=self.policy.privacy_unit,
            seed=self.seed,
            **kwargs,
        )

    def record_training(self, rnd: int, steps: int, sample_rate: float) -> bool:
        """Charge the round's noise steps (idempotent per (run_id, round)); refuses past the budget."""
        self._require_dp()
        return self._charge(self._training_event(rnd, steps, sample_rate))

    def _charge(self, event: LedgerEvent) -> bool:
        assert self.policy.epsilon_budget is not None
        with self.ledger.transaction() as cur:
            steps = self.ledger.accounted_steps(cur)
            already = any(
                e.run_id == event.run_id and e.round == event.round and e.kind == event.kind
                for e in self.ledger.events(cur)
            )
            if not already and not self._within_approved([*steps, event.step()]):
                after = compute_epsilon(
                    [*steps, event.step()],
                    self.policy.delta,
                    skip_prv_above=budget_prv_skip(self.policy),
                    accountant=self.policy.accountant,
                ).epsilon
                if after > self.policy.epsilon_budget:
                    raise PrivacyRefused(
                        Refusal(
                            "budget",
                            f"recording {event.kind} of round {event.round} would reach epsilon "
                            f"{after:.3f} > budget {self.policy.epsilon_budget:g}",
                            epsilon_after=after,
                        )
                    )
            return self.ledger.record(event, cur)

    def _within_approved(self, history: list[AccountedStep]) -> bool:
        """``history`` is a prefix of what ``plan_round`` checked against the budget (the ledger unchanged since):
        its epsilon is at most the approved one, so the charge needs no second accountant run."""
        approved = self._approved
        return approved is not None and len(history) <= len(approved) and history == approved[: len(history)]

    # ------------------------------------------------------------------ releases
    def release_bank(self, bank: Any, rnd: int, observed_contributions: int | None = None) -> PrototypeRelease:
        """Noisy (sums, counts) of the bank's accumulation window, charged to the ledger before they are returned.

        The bank must hold per-unit statistics (each unit's studies averaged per category, ``accumulate_bank`` with a
        unit key) and ``observed_contributions`` the most categories one unit touches: that is what makes the
        accounted sensitivity sqrt(L) per statistic true (``privacy.release``)."""
        self._require_dp()
        if not self.policy.release_prototypes:
            raise PrivacyRefused(Refusal("mechanism", "privacy.release_prototypes=false: the bank is not released"))
        bound = self.policy.prototype_contribution_bound
        if observed_contributions is not None and observed_contributions > bound:
            raise ValueError(
                f"a privacy unit contributes to {observed_contributions} categories of the bank, above "
                f"privacy.prototype_contribution_bound={bound}; raise the bound (more noise per unit)"
            )
        release = release_prototypes(
            bank.sum_image,
            bank.sum_text,
            bank.count,
            noise_multiplier=self.policy.prototype_noise_multiplier,
            contribution_bound=bound,
            threshold=self.policy.prototype_count_threshold,
            noise=self._release_noise,
        )
        self._charge(
            LedgerEvent(
                run_id=self.run_id,
                round=rnd,
                kind="prototype_release",
                mechanism="gaussian",
                noise_multiplier=release.noise_multiplier,
                effective_noise_multiplier=release.effective_noise_multiplier,
                sample_rate=1.0,
                steps=1,
                details={
                    "contribution_bound": bound,
                    "threshold": self.policy.prototype_count_threshold,
                    "bank": "unit_category_mean",
                    "secure_mode": self.secure_mode,
                    "noise_source": self.noise_source,
                },
            )
        )
        return release

    def record_unaccounted(self, rnd: int, what: str) -> None:
        """Log a release that left without DP (e.g. a training-loss metric); the audit flags it."""
        self.ledger.record(LedgerEvent(self.run_id, rnd, f"unaccounted:{what}", "unaccounted", 0.0, 0.0, 1.0, 0, False))

    def epsilon(self) -> EpsilonReport:
        """The ledger's epsilon under this site's ``privacy.accountant`` (PRV is cached: after a planned round this
        is the history ``plan_round`` already computed)."""
        return compute_epsilon(self.ledger.accounted_steps(), self.policy.delta, accountant=self.policy.accountant)

    def close(self) -> None:
        self.ledger.close()

    def _sigma(self) -> float:
        if self.noise_multiplier is None:
            raise ValueError("privacy.noise_multiplier is unset: set it in the site policy or call calibrate() first")
        return self.noise_multiplier

    def _require_dp(self) -> None:
        if not self.enabled:
            raise ValueError("privacy.mechanism='none': this site trains without DP")
