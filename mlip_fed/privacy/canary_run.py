"""End-to-end one-run audit: insert canary patients, train with the configured DP, score, bound epsilon.

Steinke, Nasr & Jagielski (2023) need only one training run: m canaries are each included with
probability 1/2 (a secret, seeded coin), the model is trained, every canary is scored, and the number of
correct "in/out" guesses bounds epsilon from below (``mlip_fed.privacy.canary``). The bound is valid for
any mechanism that is (eps, delta)-DP in one canary's inclusion.

Two kinds of canaries:

* ``gradient`` (default): white-box Dirac canaries (``mlip_fed.privacy.gradient_canaries``), each a privacy unit
  whose clipped gradient C * (+-e_k) is added to the engine's clipped sum before its noise. They audit the
  mechanism (noise, clipping of a unit, normalisation) and the accountant, with enough power to catch a
  broken mechanism in a few steps on a CPU; they do not audit how real records are bucketed.
* ``input``: canary patients pairing a random low-frequency image with a report of random vocabulary words,
  scored by how much the trained model prefers the canary's own report over the other canaries' reports,
  minus the same preference at initialisation. Black-box and end to end (bucketing included), but a few CPU
  steps do not memorise them: little power.

Which epsilon the verdict compares against: the one that applies to what was inserted. A gradient canary is a
privacy unit of its own (a bucket with one member, sensitivity C), so its epsilon is the accountant's at sigma
(``canary_unit_epsilon``), not the bucketed patient claim at sigma/2 (``claimed_epsilon``, sensitivity 2C). A
mechanism that applied only sigma/2 would still give every canary exactly the patient claim, so comparing gradient
canaries against the patient claim cannot see a 2x under-noised engine (nor, with a one-run audit's power, 4x). An
input canary is a patient that goes through bucketing like any other: its epsilon is the patient claim. Both
numbers are in every report.

Under-noising on purpose: ``noise_applied_fraction`` f < 1 makes the engine add sigma * f while the accountant
is still charged with sigma (f = 0.5: 2x under-noised, f = 0: noise off, the old ``noise_off=True``): a
simulated bug that the audit must catch. It is never a silent mode: ``run_canary_audit`` refuses it unless the
caller passes ``i_know_this_is_broken=True`` (old name ``i_know_noise_is_off=True``), and the report's first line
says that the configuration is deliberately broken and by how much.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlip_fed.config import ExperimentConfig
from mlip_fed.data.records import StudyRecord
from mlip_fed.privacy.accountant import AccountedStep, calibrate_noise_multiplier, compute_epsilon
from mlip_fed.privacy.canary import audit_scores
from mlip_fed.privacy.engine import SENSITIVITY_FACTOR
from mlip_fed.privacy.randomness import public_seed

CANARY_PREFIX = "canary"
CANARY_WORDS = 6
CANARY_GRID = 4


class NoiseOffRefused(ValueError):
    """An under-noised or noise-off (deliberately broken) audit configuration was asked for without the flag."""


#: The same refusal under a name that says what it covers (any noise_applied_fraction < 1).
UnderNoisingRefused = NoiseOffRefused


# ---------------------------------------------------------------------------- canaries
def canary_inclusion(m: int, seed: int) -> np.ndarray:
    """The secret coins: bool [m], each True with probability 1/2, a fixed function of (m, seed)."""
    if m < 2:
        raise ValueError(f"the audit needs at least 2 canaries, got m={m}")
    rng = np.random.default_rng(public_seed("canary-inclusion", seed))
    return rng.random(m) < 0.5


def _vocabulary_words(tokenizer: Any) -> list[str]:
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) >= 4)
    if len(words) < CANARY_WORDS:
        raise ValueError(f"the tokenizer has only {len(words)} whole words; canary reports need {CANARY_WORDS}")
    return words


def canary_image(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A random 4x4 block pattern at the image size: survives crops and small rotations, unlike pixel noise."""
    coarse = rng.random((CANARY_GRID, CANARY_GRID))
    reps = -(-image_size // CANARY_GRID)
    image = np.kron(coarse, np.ones((reps, reps)))[:image_size, :image_size]
    return (image * 255).round().astype(np.uint8)


def make_canaries(m: int, out_dir: Path, image_size: int, tokenizer: Any, seed: int) -> list[StudyRecord]:
    """m canary studies (PNG images under ``out_dir``), each its own patient ``canary-<seed>-<i>``."""
    from mlip_fed.data.manifest_writer import write_png

    words = _vocabulary_words(tokenizer)
    rng = np.random.default_rng(public_seed("canary-content", seed))
    records = []
    for i in range(m):
        image = canary_image(rng, image_size)
        report = " ".join(rng.choice(words, size=CANARY_WORDS, replace=False)) + "."
        path = out_dir / f"{CANARY_PREFIX}_{i:05d}.png"
        write_png(path, image)
        unit = f"{CANARY_PREFIX}-{seed}-{i:05d}"
        records.append(StudyRecord(image_path=path, report=report, patient_id=unit, study_id=unit, site_id="canary"))
    return records


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def pair_margins(model: Any, records: Sequence[StudyRecord], cfg: ExperimentConfig) -> np.ndarray:
    """cos(img_c, txt_c) - mean_{j != c} cos(img_c, txt_j) over the canaries, eval transforms, eval mode."""
    from mlip_fed.pipeline import eval_dataset

    was_training = model.training
    model.eval()
    try:
        dataset = eval_dataset(records, cfg)
        images = torch.stack([dataset[i]["image"] for i in range(len(records))])
        device = next(model.parameters()).device
        image_emb = F.normalize(model.encode_image(images.to(device)).embedding, dim=-1)
        tok = model.tokenizer(
            [r.report for r in records],
            padding=True,
            truncation=True,
            max_length=cfg.model.text.max_length,
            return_tensors="pt",
        )
        text_emb = F.normalize(
            model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).embedding, dim=-1
        )
    finally:
        model.train(was_training)
    sim = (image_emb @ text_emb.t()).double().cpu()
    m = sim.shape[0]
    own = sim.diagonal()
    others = (sim.sum(dim=1) - own) / (m - 1)
    return (own - others).numpy()


# ---------------------------------------------------------------------------- the audit
class CanaryVerdict:
    """What every canary report (gradient/input and release) derives the same way from its fields.

    A subclass is a frozen dataclass with ``epsilon_lower_bound``, ``noise_applied_fraction`` and the claimed /
    applied noise multipliers, and defines ``verdict_against``, ``verdict_epsilon`` and the wording of its broken
    line (``claimed_name``, ``none_added``, ``adder``).
    """

    claimed_name = "sigma"
    none_added = "none is added"
    adder = "the engine adds"

    @property
    def verdict_against(self) -> str:
        raise NotImplementedError

    @property
    def verdict_epsilon(self) -> float:
        raise NotImplementedError

    @property
    def passed(self) -> bool:
        return self.epsilon_lower_bound <= self.verdict_epsilon  # type: ignore[attr-defined]

    @property
    def broken(self) -> bool:
        """Deliberately under-noised (noise_applied_fraction < 1, noise off included)."""
        return self.noise_applied_fraction < 1.0  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """The report as report.json holds it."""
        return {
            **asdict(self),  # type: ignore[call-overload]
            "deliberately_broken": self.broken,
            "verdict_against": self.verdict_against,
            "verdict_epsilon": self.verdict_epsilon,
            "passed": self.passed,
        }

    def broken_line(self) -> str | None:
        """The first line of a deliberately broken report (noise off or under-noised), None for a correct one."""
        if not self.broken:
            return None
        claimed = self.noise_multiplier_claimed  # type: ignore[attr-defined]
        applied = self.noise_multiplier_applied  # type: ignore[attr-defined]
        fraction = self.noise_applied_fraction  # type: ignore[attr-defined]
        if fraction == 0:
            return (
                f"!! NOISE OFF: deliberately broken configuration (the accountant claims {self.claimed_name}="
                f"{claimed:.4g}, {self.none_added})"
            )
        return (
            f"!! UNDER-NOISED {1 / fraction:.3g}x: deliberately broken configuration "
            f"(the accountant claims {self.claimed_name}={claimed:.4g}, {self.adder} {fraction:g} of it: "
            f"sigma={applied:.4g})"
        )


@dataclass(frozen=True)
class CanaryRunReport(CanaryVerdict):
    mechanism: str
    kind: str
    noise_off: bool
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
    claimed_epsilon: float
    claimed_epsilon_rdp: float
    claimed_epsilon_prv: float | None
    canary_unit_epsilon: float
    noise_multiplier_claimed: float
    noise_multiplier_applied: float
    sample_rate: float
    steps: int
    num_buckets: int
    clipping_norm: float
    site_records: int
    seconds: float

    @property
    def verdict_against(self) -> str:
        """Which epsilon the verdict uses: ``canary_unit_epsilon`` (gradient) or ``claimed_epsilon`` (input)."""
        return "canary_unit_epsilon" if self.kind == "gradient" else "claimed_epsilon"

    @property
    def verdict_epsilon(self) -> float:
        """The epsilon that applies to one inserted canary, which the lower bound must not exceed."""
        return self.canary_unit_epsilon if self.kind == "gradient" else self.claimed_epsilon

    def text(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = []
        broken = self.broken_line()
        if broken is not None:
            lines.append(broken)
        prv = "n/a" if self.claimed_epsilon_prv is None else f"{self.claimed_epsilon_prv:.4f}"
        factor = SENSITIVITY_FACTOR.get(self.mechanism, 1.0)
        at = "sigma" if factor == 1 else f"sigma/{factor:g}"
        if self.kind == "gradient" and factor != 1:
            why = (
                "a gradient canary is a unit of its own (sensitivity C, charged at sigma), not a patient joining a "
                f"bucket (charged at {at}): the canary-unit epsilon is the one that applies to it"
            )
        elif self.kind == "gradient":
            why = "a gradient canary is a unit of its own (sensitivity C, charged at sigma, like every unit here)"
        else:
            why = "an input canary is a patient, bucketed like any other: the patient claim applies to it"
        used = "canary-unit epsilon" if self.verdict_against == "canary_unit_epsilon" else "claimed epsilon"
        lines += [
            f"One-run canary audit ({self.mechanism}, {self.kind} canaries, Steinke-Nasr-Jagielski 2023)",
            f"  canaries          : {self.canaries} {self.kind} canaries ({self.included} included by secret coin "
            "flips)",
            f"  guesses           : {self.guesses} (top {self.k_plus} 'in', bottom {self.k_minus} 'out'), "
            f"{self.correct} correct",
            f"  epsilon lower bnd : {self.epsilon_lower_bound:.4f} at {self.confidence:.0%} confidence, "
            f"delta={self.delta:g}",
            f"  claimed epsilon   : {self.claimed_epsilon:.4f} (a data unit, e.g. a patient, charged at {at}: max of "
            f"RDP {self.claimed_epsilon_rdp:.4f}, PRV {prv})",
            f"  canary-unit eps   : {self.canary_unit_epsilon:.4f} "
            "(a lone canary unit: sensitivity C, charged at sigma)",
            f"  run               : sigma claimed {self.noise_multiplier_claimed:.4g}, applied "
            f"{self.noise_multiplier_applied:.4g} ({self.noise_applied_fraction:g} of it); q={self.sample_rate:.4g}, "
            f"{self.steps} steps, {self.num_buckets} buckets, C={self.clipping_norm:g}; {self.site_records} site "
            f"records; {self.seconds:.0f} s",
            f"  verdict           : {verdict} (lower bound {self.epsilon_lower_bound:.4f} "
            f"{'<=' if self.passed else '>'} {used} {self.verdict_epsilon:.4f})",
            f"  compared against  : {used}; {why}",
        ]
        return "\n".join(lines) + "\n"


def check_noise_applied(noise_applied_fraction: float, i_know_this_is_broken: bool) -> None:
    """Refuse a deliberately under-noised audit (fraction < 1) unless it is explicitly confirmed; check the range."""
    if not 0.0 <= noise_applied_fraction <= 1.0:
        raise ValueError(f"--noise-applied-fraction must be in [0, 1], got {noise_applied_fraction}")
    if noise_applied_fraction < 1.0 and not i_know_this_is_broken:
        what = "noise off" if noise_applied_fraction == 0 else f"{1 / noise_applied_fraction:.3g}x under-noising"
        raise NoiseOffRefused(
            f"{what} (noise applied fraction {noise_applied_fraction:g}) trains with less noise than the accountant "
            "is charged for, so the claimed epsilon is false; it exists only to show the audit catches a broken "
            "implementation. Pass --i-know-this-is-broken (old name: --i-know-noise-is-off) to run it."
        )


def resolve_noise_applied_fraction(noise_off: bool, noise_applied_fraction: float | None) -> float:
    """``noise_off=True`` is the old spelling of fraction 0; both at once must agree. Default 1 (correct)."""
    if noise_off:
        if noise_applied_fraction not in (None, 0.0):
            raise ValueError(
                f"--noise-off means noise applied fraction 0; got also --noise-applied-fraction "
                f"{noise_applied_fraction}"
            )
        return 0.0
    return 1.0 if noise_applied_fraction is None else float(noise_applied_fraction)


def check_noise_off(noise_off: bool, i_know_noise_is_off: bool) -> None:
    """Backward-compatible form of ``check_noise_applied`` for the noise-off case."""
    check_noise_applied(0.0 if noise_off else 1.0, i_know_noise_is_off)


CANARY_KINDS = ("gradient", "input")


def default_guesses(m: int, kind: str = "gradient") -> tuple[int, int]:
    """k+ = k- fixed before any score is seen (choosing them afterwards would inflate the bound).

    Gradient canaries separate cleanly when the mechanism leaks, so a quarter of the canaries each way (half
    guessed in all) lets a perfect guesser reach eps ~ 5 at m = 1000; input canaries are noisier: m/8 each way.
    """
    if kind not in CANARY_KINDS:
        raise ValueError(f"unknown canary kind {kind!r}; expected one of {CANARY_KINDS}")
    k = max(1, m // (4 if kind == "gradient" else 8))
    return k, k


@dataclass
class _Run:
    """What both canary kinds share: the site's data, the model and the DP engine settings of the audit."""

    cfg: ExperimentConfig
    sigma: float
    factor: float
    sample_rate: float
    steps: int
    noise_applied_fraction: float
    progress: bool

    def train(self, model: Any, records: Sequence[StudyRecord], extra: Any = None) -> tuple[Any, Any]:
        """Train ``model`` on ``records`` with the configured DP for ``steps`` noise steps; (engine, trainer).

        Through the site's façade (``SitePrivacy``), so the audit measures the loader and engine a site gets. Two
        audit-only settings: the noise is seeded (``insecure_reproducible_noise``: the harness is reproducible, its
        noisy output is scored here and never released), and sigma is the audit's (times ``noise_applied_fraction``
        < 1 only in the deliberately broken configurations; the claimed epsilon is computed here at sigma). Nothing
        is charged: the façade's ledger is a throwaway.
        """
        from mlip_fed import pipeline
        from mlip_fed.privacy.site_privacy import SitePrivacy
        from mlip_fed.train.trainer import LocalTrainer

        policy = self.cfg.privacy.model_copy(
            update={
                "noise_multiplier": self.sigma * self.noise_applied_fraction,
                "min_noise_multiplier": 0.0,
                "insecure_reproducible_noise": True,
            }
        )
        train_cfg = self.cfg.train.model_copy(
            update={"max_steps": self.steps, "grad_accum_steps": 1, "progress_bar": self.progress}
        )
        with tempfile.TemporaryDirectory(prefix="canary_ledger_") as ledger_dir:
            site = SitePrivacy(
                policy,
                Path(ledger_dir) / "ledger.sqlite",
                len(records),
                "canary-audit",
                site="canary-audit",
                seed=public_seed("canary", self.cfg.seed),
            )
            try:
                loader = site.poisson_loader(
                    pipeline.train_dataset(records, self.cfg),
                    pipeline.build_collator(model, self.cfg),
                    [r.patient_id for r in records],
                    self.sample_rate,
                )
                engine = site.gradient_fn(model, extra_unit_gradients=extra)
                trainer = LocalTrainer(model, train_cfg, total_steps=self.steps, gradient_fn=engine)
                try:
                    trainer.fit(loader, epochs=-(-self.steps // len(loader)))
                finally:
                    engine.close()
            finally:
                site.close()
        return engine, trainer


def run_canary_audit(
    cfg: ExperimentConfig,
    out_dir: Path,
    *,
    m: int,
    steps: int,
    sample_rate: float,
    kind: str = "gradient",
    site: int | None = 0,
    k_plus: int | None = None,
    k_minus: int | None = None,
    significance: float = 0.05,
    noise_off: bool = False,
    i_know_noise_is_off: bool = False,
    noise_applied_fraction: float | None = None,
    i_know_this_is_broken: bool = False,
    progress: bool = False,
) -> CanaryRunReport:
    """Insert m canaries (each with probability 1/2) into a site's DP training run, score them, bound epsilon.

    ``kind="gradient"`` (default): white-box Dirac gradient canaries added to the engine's clipped sum
    (``mlip_fed.privacy.gradient_canaries``); ``kind="input"``: canary patients (random image + random words)
    added to the site's records, scored by their image-text margin. sigma is ``privacy.noise_multiplier`` or, if
    unset, calibrated so that ``steps`` steps at ``sample_rate`` cost ``privacy.epsilon_budget``; the claimed
    epsilon is the accountant's for exactly this run. Writes ``canaries.csv`` (id, included, score, ...) under
    ``out_dir``. The verdict compares the lower bound with ``canary_unit_epsilon`` for gradient canaries and with
    ``claimed_epsilon`` for input canaries (``CanaryRunReport.verdict_epsilon``).

    ``noise_applied_fraction`` (default 1): the engine adds sigma * fraction while the accountant is charged sigma;
    < 1 is deliberately broken (0.5: 2x under-noised; 0: noise off, also spelled ``noise_off=True``) and refused
    (``NoiseOffRefused``) unless ``i_know_this_is_broken`` (or its old name ``i_know_noise_is_off``) is True.
    """
    import time

    from mlip_fed import pipeline

    fraction = resolve_noise_applied_fraction(noise_off, noise_applied_fraction)
    check_noise_applied(fraction, i_know_this_is_broken or i_know_noise_is_off)
    policy = cfg.privacy
    if policy.mechanism == "none":
        raise ValueError("privacy.mechanism='none' claims no epsilon: audit privacy=bucketed or privacy=decomposable")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    default_kp, default_km = default_guesses(m, kind)
    k_plus = default_kp if k_plus is None else k_plus
    k_minus = default_km if k_minus is None else k_minus
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m or k_plus + k_minus == 0:
        raise ValueError(f"need 0 < k_plus + k_minus <= m={m}, got k_plus={k_plus}, k_minus={k_minus}")

    started = time.perf_counter()
    pipeline.configure_threads(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    factor = SENSITIVITY_FACTOR[policy.mechanism]
    if policy.noise_multiplier is not None:
        sigma = policy.noise_multiplier
    else:
        assert policy.epsilon_budget is not None
        sigma = calibrate_noise_multiplier(
            policy.epsilon_budget, policy.delta, sample_rate, steps, sensitivity_factor=factor
        )
    sigma = max(sigma, policy.min_noise_multiplier)
    run = _Run(cfg, sigma, factor, sample_rate, steps, fraction, progress)
    data = pipeline.load_records(cfg.data, site)
    model = pipeline.build_model(cfg)
    included = canary_inclusion(m, cfg.seed)
    if kind == "gradient":
        scores, engine_steps = _gradient_audit(run, model, data.train, included, out_dir)
    else:
        scores, engine_steps = _input_audit(run, model, data.train, included, out_dir)

    accounted = compute_epsilon([AccountedStep(sigma / factor, sample_rate, engine_steps)], policy.delta)
    canary_unit = compute_epsilon([AccountedStep(sigma, sample_rate, engine_steps)], policy.delta)
    audit = audit_scores(
        scores, included, k_plus=k_plus, k_minus=k_minus, delta=policy.delta, significance=significance
    )
    return CanaryRunReport(
        mechanism=policy.mechanism,
        kind=kind,
        noise_off=fraction == 0.0,
        noise_applied_fraction=fraction,
        canaries=m,
        included=int(included.sum()),
        guesses=audit.guesses,
        k_plus=k_plus,
        k_minus=k_minus,
        correct=audit.correct,
        epsilon_lower_bound=audit.epsilon_lower_bound,
        confidence=1 - significance,
        delta=policy.delta,
        claimed_epsilon=accounted.epsilon,
        claimed_epsilon_rdp=accounted.rdp,
        claimed_epsilon_prv=accounted.prv,
        canary_unit_epsilon=canary_unit.epsilon,
        noise_multiplier_claimed=sigma,
        noise_multiplier_applied=sigma * fraction,
        sample_rate=sample_rate,
        steps=engine_steps,
        num_buckets=policy.num_buckets,
        clipping_norm=policy.clipping_norm,
        site_records=len(data.train),
        seconds=time.perf_counter() - started,
    )


def _input_audit(
    run: _Run, model: Any, site_records: Sequence[StudyRecord], included: np.ndarray, out_dir: Path
) -> tuple[np.ndarray, int]:
    canaries = make_canaries(
        len(included), out_dir / "canaries", run.cfg.data.image_size, model.tokenizer, run.cfg.seed
    )
    initial = pair_margins(model, canaries, run.cfg)
    records = [*site_records, *(c for c, inc in zip(canaries, included, strict=True) if inc)]
    engine, _ = run.train(model, records)
    trained = pair_margins(model, canaries, run.cfg)
    write_scores(out_dir / "canaries.csv", canaries, included, initial, trained)
    return trained - initial, engine.steps


def _gradient_audit(
    run: _Run, model: Any, site_records: Sequence[StudyRecord], included: np.ndarray, out_dir: Path
) -> tuple[np.ndarray, int]:
    from mlip_fed.io import atomic_write_text
    from mlip_fed.privacy.gradient_canaries import CanaryGradients, dirac_canaries, weight_decay_factor

    params = [p for p in model.parameters() if p.requires_grad]  # the engine's order (UnitGradient.param)
    canaries = dirac_canaries([p.numel() for p in params], len(included), run.cfg.seed)
    extra = CanaryGradients(
        canaries,
        included,
        clipping_norm=run.cfg.privacy.clipping_norm,
        sample_rate=run.sample_rate,
        seed=public_seed("canary-steps", run.cfg.seed),
    )
    initial = extra.coordinates(params)
    engine, trainer = run.train(model, site_records, extra)
    final = extra.coordinates(params)
    lr_factor = trainer.scheduler.lr_lambdas[0]
    decay = weight_decay_factor(
        [run.cfg.train.lr * lr_factor(t) for t in range(engine.steps)], run.cfg.train.weight_decay
    )
    scores = extra.scores(extra.first_moments(trainer.optimizer, params))
    moves = extra.parameter_moves(initial, final, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["canary_id", "included", "score", "parameter", "index", "sign", "sampled_steps"]
        + ["theta_init", "theta_trained", "parameter_move"]
    )
    rows = zip(canaries, included, scores, extra.sampled, initial, final, moves, strict=True)
    for i, (c, inc, score, k, a, b, move) in enumerate(rows):
        name = names[id(params[c.param])]
        writer.writerow(
            [f"dirac-{run.cfg.seed}-{i:05d}", int(inc), f"{score:.8g}", name, c.index, int(c.sign), int(k)]
            + [f"{a:.8g}", f"{b:.8g}", f"{move:.8g}"]
        )
    atomic_write_text(out_dir / "canaries.csv", buffer.getvalue())
    return scores, engine.steps


def write_scores(
    path: Path, canaries: Sequence[StudyRecord], included: np.ndarray, initial: np.ndarray, trained: np.ndarray
) -> None:
    """``canary-audit --scores`` reads this back: the audit can be recomputed with other k+/k- later."""
    from mlip_fed.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["canary_id", "included", "score", "margin_init", "margin_trained"])
    for rec, inc, a, b in zip(canaries, included, initial, trained, strict=True):
        writer.writerow([rec.patient_id, int(inc), f"{b - a:.8g}", f"{a:.8g}", f"{b:.8g}"])
    atomic_write_text(path, buffer.getvalue())


__all__ = [
    "CANARY_KINDS",
    "CanaryRunReport",
    "NoiseOffRefused",
    "UnderNoisingRefused",
    "canary_inclusion",
    "check_noise_applied",
    "check_noise_off",
    "default_guesses",
    "make_canaries",
    "pair_margins",
    "resolve_noise_applied_fraction",
    "run_canary_audit",
    "write_scores",
]
