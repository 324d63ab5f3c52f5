"""One-run canary audit of the prototype-bank release (``canary-run --canary-kind release``).

The gradient and input canaries audit DP training; the prototype release (``mlip_fed.privacy.release``) is a
separate Gaussian mechanism with its own epsilon, charged once per round. These canaries travel through it:

* **Canaries.** m canary units, each included by a secret coin (``canary_inclusion``). Canary i is the largest
  contribution one unit may make under the release's accounted bound: it touches L = the public
  ``prototype_contribution_bound`` category rows, adding to each a unit-norm image mean (+-1 on the row's only
  coordinate, a per-canary random sign), the same text mean and a count of 1 -- L2 norm sqrt(L) per statistic,
  sqrt(3 L) in all, exactly the sensitivity the release is accounted for.
* **Own coordinates.** The audit bank has m * L category rows of dimension 1: canary i owns rows
  [i L, (i + 1) L), so every canary is scored on coordinates no other canary touches (one release, m independent
  trials). Every row also holds B public background units (their embeddings cancel, count B = threshold + 10 sigma),
  so the release's thresholding runs on the noisy counts as at a site and keeps canary rows with overwhelming
  probability; a suppressed row scores as released (zeros), i.e. post-processing.
* **Release.** One call of the site's ``release_prototypes`` with the policy's ``prototype_noise_multiplier``,
  contribution bound and threshold, noise from a (seeded: the harness is reproducible, its output never
  released) ``GaussianNoise`` in the policy's ``secure_mode``: the noise is not re-implemented here.
* **Score** of canary i: sum over its L rows of sign_i * (image + text) + (count - B), the sufficient statistic:
  mean 3 L if included, 0 if not, standard deviation sigma sqrt(3 L), i.e. a Gaussian mechanism at
  z = sigma / sqrt(3 L), the release's accounted effective noise multiplier.
* **Verdict.** ``audit_scores`` (top k+ guessed in, bottom k- out) gives the one-run lower bound; it is compared with
  the epsilon the release charges a unit (the site's accountant on one step at z, sample rate 1).

``noise_applied_fraction`` f < 1 (refused without ``i_know_this_is_broken``) draws the release noise at f sigma while
the accountant is charged sigma: a simulated bug the audit must catch (``release_prototypes(...,
noise_applied_fraction=f)``, a parameter the site never passes).

What they do not audit: how a site builds the bank (per-unit category means, ``mlip_fed.privacy.bank_bound``) and
whether a real unit stays within the bound (``contribution_count``); the canaries are built within the bound.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlip_fed.config import ExperimentConfig
from mlip_fed.privacy.accountant import AccountedStep, compute_epsilon
from mlip_fed.privacy.canary import audit_scores
from mlip_fed.privacy.canary_run import CanaryVerdict, canary_inclusion, check_noise_applied
from mlip_fed.privacy.randomness import GaussianNoise, public_seed
from mlip_fed.privacy.release import PrototypeRelease, release_effective_noise, release_prototypes

RELEASE_KIND = "release"
#: A canary costs 3 L coordinates of one release (no training), so many are cheap; 100 000 with 1000 guesses each
#: way separate a correct release from a 2x under-noised one at the bucketed policy (docs/privacy.md).
DEFAULT_RELEASE_CANARIES = 100_000
#: Background units per row beyond the threshold, in units of sigma: rows are kept unless the noise is < -10 sigma.
BACKGROUND_SIGMAS = 10.0


def default_release_guesses(m: int) -> tuple[int, int]:
    """k+ = k- = m/100, fixed before any score is seen: at the release's small per-canary signal (z ~ 3) only the
    extreme scores carry evidence; guessing a quarter each way (as for gradient canaries) dilutes it."""
    k = max(1, m // 100)
    return k, k


def background_count(noise_multiplier: float, threshold: float) -> float:
    """Public background units per audit row: the noisy count clears the threshold unless the noise is < -10 sigma."""
    return float(math.ceil(threshold + BACKGROUND_SIGMAS * noise_multiplier))


def release_canary_bank(
    included: np.ndarray, contribution_bound: int, background: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(sum_image [m L, 1], sum_text [m L, 1], count [m L], signs [m]): canary i owns rows [i L, (i + 1) L)."""
    m, rows = len(included), contribution_bound
    signs = np.where(np.random.default_rng(public_seed("release-canary-signs", seed)).random(m) < 0.5, -1.0, 1.0)
    member = torch.from_numpy(np.repeat(included.astype(np.float32), rows))
    sign = torch.from_numpy(np.repeat(signs.astype(np.float32), rows))
    sum_image = (member * sign).unsqueeze(1)  # a unit-norm mean embedding (+-e_0) per row touched
    sum_text = sum_image.clone()
    count = member + background  # a count of 1 per row touched, on B background units
    return sum_image, sum_text, count, signs


def release_canary_scores(release: PrototypeRelease, signs: np.ndarray, rows: int, background: float) -> np.ndarray:
    """Per canary: sum over its rows of sign * (image + text) + (count - B), from the released values only."""
    m = len(signs)
    image = release.sum_image[:, 0].double().view(m, rows)
    text = release.sum_text[:, 0].double().view(m, rows)
    count = release.count.double().view(m, rows)
    sign = torch.from_numpy(signs).unsqueeze(1)
    return (sign * (image + text) + (count - background)).sum(dim=1).numpy()


@dataclass(frozen=True)
class ReleaseCanaryReport(CanaryVerdict):
    kind: str
    noise_applied_fraction: float
    canaries: int
    included: int
    guesses: int
    k_plus: int
    k_minus: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float
    release_epsilon: float
    release_epsilon_rdp: float
    release_epsilon_prv: float | None
    accountant: str
    noise_multiplier_claimed: float
    noise_multiplier_applied: float
    effective_noise_multiplier: float
    contribution_bound: int
    threshold: float
    background_count: float
    rows: int
    rows_suppressed: int
    seconds: float

    claimed_name = "prototype sigma"  # wording of the broken line (class attributes, not fields)
    none_added = "the release adds none"
    adder = "the release adds"

    @property
    def verdict_against(self) -> str:
        return "release_epsilon"

    @property
    def verdict_epsilon(self) -> float:
        """What one release charges a unit (the canary is a unit at the accounted bound)."""
        return self.release_epsilon

    def text(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        prv = "n/a" if self.release_epsilon_prv is None else f"{self.release_epsilon_prv:.4f}"
        lines = [] if self.broken_line() is None else [str(self.broken_line())]
        lines += [
            "One-run canary audit (prototype release, release canaries, Steinke-Nasr-Jagielski 2023)",
            f"  canaries          : {self.canaries} release canaries ({self.included} included by secret coin flips), "
            f"each a unit on {self.contribution_bound} rows of its own (unit-norm image/text mean, count 1)",
            f"  guesses           : {self.guesses} (top {self.k_plus} 'in', bottom {self.k_minus} 'out'), "
            f"{self.correct} correct",
            f"  epsilon lower bnd : {self.epsilon_lower_bound:.4f} at {self.confidence:.0%} confidence, "
            f"delta={self.delta:g}",
            f"  release epsilon   : {self.release_epsilon:.4f} (one release, {self.accountant} of RDP "
            f"{self.release_epsilon_rdp:.4f}, PRV {prv}; z = sigma / sqrt(3 L) = {self.effective_noise_multiplier:.4g})",
            f"  release           : prototype sigma claimed {self.noise_multiplier_claimed:.4g}, applied "
            f"{self.noise_multiplier_applied:.4g} ({self.noise_applied_fraction:g} of it); L={self.contribution_bound}, "
            f"threshold {self.threshold:g}, {self.background_count:g} background units per row; {self.rows} rows, "
            f"{self.rows_suppressed} suppressed; {self.seconds:.1f} s",
            f"  verdict           : {verdict} (lower bound {self.epsilon_lower_bound:.4f} "
            f"{'<=' if self.passed else '>'} release epsilon {self.release_epsilon:.4f})",
        ]
        return "\n".join(lines) + "\n"


def run_release_canary_audit(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    m: int = DEFAULT_RELEASE_CANARIES,
    k_plus: int | None = None,
    k_minus: int | None = None,
    significance: float = 0.05,
    noise_applied_fraction: float = 1.0,
    i_know_this_is_broken: bool = False,
) -> ReleaseCanaryReport:
    """m release canaries through one ``release_prototypes`` at ``cfg.privacy``'s prototype settings; bound epsilon.

    Writes ``canaries.csv`` (canary_id, included, score, first_row, sign; ``canary-audit --scores`` reads it) under
    ``out_dir``. ``noise_applied_fraction`` < 1 is deliberately broken and refused (``NoiseOffRefused``) unless
    ``i_know_this_is_broken``.
    """
    from mlip_fed.io import atomic_write_text

    check_noise_applied(noise_applied_fraction, i_know_this_is_broken)
    policy = cfg.privacy
    if policy.mechanism == "none":
        raise ValueError(
            "privacy.mechanism='none' releases the bank without DP: audit privacy=bucketed or privacy=decomposable"
        )
    default_k = default_release_guesses(m)
    k_plus = default_k[0] if k_plus is None else k_plus
    k_minus = default_k[1] if k_minus is None else k_minus
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m or k_plus + k_minus == 0:
        raise ValueError(f"need 0 < k_plus + k_minus <= m={m}, got k_plus={k_plus}, k_minus={k_minus}")

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    sigma, bound, threshold = (
        policy.prototype_noise_multiplier,
        policy.prototype_contribution_bound,
        policy.prototype_count_threshold,
    )
    included = canary_inclusion(m, cfg.seed)
    background = background_count(sigma, threshold)
    sum_image, sum_text, count, signs = release_canary_bank(included, bound, background, cfg.seed)
    release = release_prototypes(
        sum_image,
        sum_text,
        count,
        noise_multiplier=sigma,
        contribution_bound=bound,
        threshold=threshold,
        # seeded: the audit harness is reproducible; its noisy output is scored here, never released
        noise=GaussianNoise(public_seed("canary-release-noise", cfg.seed), secure_mode=policy.secure_mode),
        noise_applied_fraction=noise_applied_fraction,
    )
    scores = release_canary_scores(release, signs, bound, background)
    z = release_effective_noise(sigma, bound)
    charged = compute_epsilon([AccountedStep(z, 1.0, 1)], policy.delta, accountant=policy.accountant)
    audit = audit_scores(
        scores, included, k_plus=k_plus, k_minus=k_minus, delta=policy.delta, significance=significance
    )

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["canary_id", "included", "score", "first_row", "sign"])
    for i, (inc, score, sign) in enumerate(zip(included, scores, signs, strict=True)):
        writer.writerow([f"release-{cfg.seed}-{i:06d}", int(inc), f"{score:.8g}", i * bound, int(sign)])
    atomic_write_text(out_dir / "canaries.csv", buffer.getvalue())

    return ReleaseCanaryReport(
        kind=RELEASE_KIND,
        noise_applied_fraction=noise_applied_fraction,
        canaries=m,
        included=int(included.sum()),
        guesses=audit.guesses,
        k_plus=k_plus,
        k_minus=k_minus,
        correct=audit.correct,
        epsilon_lower_bound=audit.epsilon_lower_bound,
        confidence=1 - significance,
        delta=policy.delta,
        release_epsilon=charged.epsilon,
        release_epsilon_rdp=charged.rdp,
        release_epsilon_prv=charged.prv,
        accountant=policy.accountant,
        noise_multiplier_claimed=sigma,
        noise_multiplier_applied=sigma * noise_applied_fraction,
        effective_noise_multiplier=release.effective_noise_multiplier,
        contribution_bound=bound,
        threshold=threshold,
        background_count=background,
        rows=int(count.shape[0]),
        rows_suppressed=int((~release.kept).sum()),
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "DEFAULT_RELEASE_CANARIES",
    "RELEASE_KIND",
    "ReleaseCanaryReport",
    "background_count",
    "default_release_guesses",
    "release_canary_bank",
    "release_canary_scores",
    "run_release_canary_audit",
]
