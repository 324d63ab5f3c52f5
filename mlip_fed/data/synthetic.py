"""SynthCXR: procedural frontal chest radiographs with spatial ground truth, across simulated hospitals.

Every quality number of the project is measured here until a hospital connects real data, so the
generator aims to be *worth measuring on*: anatomy varies per patient, findings are small and low in
contrast, sites differ in acquisition (contrast, gamma, noise, blur, field of view, markers) and in
case mix, and follow-up studies of one patient share anatomy and persistent findings. A linear model
on raw pixels should do clearly better than chance but far from perfect (see ``docs/synthcxr.md``).

Geometry is written in normalised body coordinates (``u`` right on the image, ``v`` down, both in
[0, 1]), so 64² and 224² images show the same patient. Patient right is image left (PA convention).
Rendering is vectorised numpy over the pixel grid; loops run over anatomical parts (ribs, line
segments), never over pixels.

Randomness: one ``numpy.random.Generator`` per (seed, site, patient[, study]) built from a
``SeedSequence``, so adding sites or studies never changes the ones generated before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

Laterality = str  # "left" | "right" | "bilateral" (the patient's side)


# --------------------------------------------------------------------------------------------------
# The finding table: one row per synthetic finding kind. The mask label value is the row's index.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingSpec:
    """What a finding kind is, how often it occurs and which CheXpert categories a report asserts.

    ``categories[0]`` is the primary category: a hedged statement names only it ("Possible early
    pneumonia." asserts Pneumonia = -1 and says nothing of Consolidation or Lung Opacity).
    """

    kind: str
    categories: tuple[str, ...]
    severities: tuple[str, ...]
    base_prevalence: float
    lateralities: tuple[Laterality | None, ...]
    hedgeable: bool
    #: Probability that a finding present in the prior study persists into a follow-up.
    persistence: float


FINDING_SPECS: tuple[FindingSpec, ...] = (
    FindingSpec("cardiomegaly", ("Cardiomegaly",), ("mild", "moderate", "severe"), 0.14, (None,), True, 0.95),
    FindingSpec(
        "enlarged_cardiomediastinum", ("Enlarged Cardiomediastinum",), ("mild", "moderate"), 0.05, (None,), True, 0.9
    ),
    FindingSpec(
        "pleural_effusion",
        ("Pleural Effusion",),
        ("trace", "small", "moderate", "large"),
        0.16,
        ("left", "right", "right", "left", "bilateral"),
        True,
        0.7,
    ),
    FindingSpec("pneumothorax", ("Pneumothorax",), ("tiny", "small", "moderate"), 0.06, ("left", "right"), True, 0.4),
    FindingSpec(
        "consolidation",
        ("Consolidation", "Lung Opacity"),
        ("mild", "moderate", "severe"),
        0.08,
        ("left", "right"),
        True,
        0.5,
    ),
    FindingSpec(
        "pneumonia",
        ("Pneumonia", "Consolidation", "Lung Opacity"),
        ("mild", "moderate", "severe"),
        0.08,
        ("left", "right"),
        True,
        0.5,
    ),
    FindingSpec("nodule", ("Lung Lesion",), ("subcentimeter", "small"), 0.06, ("left", "right"), True, 0.95),
    FindingSpec("mass", ("Lung Lesion",), ("small", "large"), 0.03, ("left", "right"), False, 0.95),
    FindingSpec("atelectasis", ("Atelectasis",), ("mild", "moderate"), 0.12, ("left", "right", "bilateral"), True, 0.5),
    FindingSpec("edema", ("Edema",), ("mild", "moderate", "severe"), 0.09, ("bilateral",), True, 0.5),
    FindingSpec("endotracheal_tube", ("Support Devices",), (), 0.07, (None,), False, 0.6),
    FindingSpec("central_line", ("Support Devices",), (), 0.11, ("right", "left", "right"), False, 0.7),
    FindingSpec("rib_fracture", ("Fracture",), ("acute", "healing"), 0.05, ("left", "right"), True, 0.9),
    FindingSpec("pleural_thickening", ("Pleural Other",), (), 0.04, ("left", "right"), False, 0.95),
)

FINDINGS: dict[str, FindingSpec] = {spec.kind: spec for spec in FINDING_SPECS}

#: Segmentation classes: label PNG value ``k`` (1..14) is ``MASK_CLASS_NAMES[k - 1]``; 0 is background.
MASK_CLASS_NAMES: tuple[str, ...] = tuple(spec.kind for spec in FINDING_SPECS)
MASK_INDEX: dict[str, int] = {kind: i + 1 for i, kind in enumerate(MASK_CLASS_NAMES)}

#: Lobe (knowledge-base anatomy id) per (patient side, zone); the left lung has no middle lobe.
LOBES: dict[tuple[str, str], str] = {
    ("right", "upper"): "right_upper_lobe",
    ("right", "mid"): "right_middle_lobe",
    ("right", "lower"): "right_lower_lobe",
    ("left", "upper"): "left_upper_lobe",
    ("left", "mid"): "lingula",
    ("left", "lower"): "left_lower_lobe",
}
_ZONE_OF_LOBE: dict[str, tuple[str, str]] = {lobe: key for key, lobe in LOBES.items()}

#: Kinds that never co-occur in one study (the first one listed wins).
_EXCLUSIVE: tuple[tuple[str, str], ...] = (("pneumonia", "consolidation"), ("mass", "nodule"))


def _check_table() -> None:
    for spec in FINDING_SPECS:
        unknown = [c for c in spec.categories if c not in CHEXPERT_CATEGORIES]
        if unknown:
            raise ValueError(f"finding {spec.kind!r}: unknown CheXpert categories {unknown}")


_check_table()


# --------------------------------------------------------------------------------------------------
# Difficulty tiers: how visible findings are. One table of scales per tier, applied at render time only.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingScale:
    """How one finding kind is drawn in a tier, relative to ``standard`` (1.0 = as in ``standard``).

    ``contrast`` multiplies the density the finding adds (for a pneumothorax both the darker rim and
    the pleural line). ``size`` multiplies its spatial extent: radius (nodule, mass, airspace), width
    (tubes, lines, atelectatic band, apical cap), fluid height (effusion), rim gap (pneumothorax),
    haze extent (edema), callus radius and step (fracture), cardiothoracic ratio (cardiomegaly) and
    upper-mediastinal widening factor (enlarged cardiomediastinum). Cardiomegaly and a widened
    mediastinum add no density of their own, so their ``contrast`` has no effect.
    """

    contrast: float = 1.0
    size: float = 1.0


@dataclass(frozen=True)
class DifficultyTier:
    """A SynthCXR difficulty: per-finding scales plus image-wide ones (site noise, blur, lung markings).

    A tier changes pixels only: for the same seed every tier draws the same patients, findings, views
    and reports (labels and text are identical), because no scale changes what is drawn from the RNG.
    """

    name: str
    findings: dict[str, FindingScale]
    #: Multiplies each site's acquisition noise std.
    noise: float = 1.0
    #: Multiplies each site's blur sigma.
    blur: float = 1.0
    #: Multiplies the exposure's drawn shift and rotation: where the body sits moves more, which blurs the fixed-position
    #: templates a raw-pixel model relies on and costs a translation-invariant network nothing.
    pose: float = 1.0
    #: Multiplies the amplitude of the lung markings (the anatomical clutter findings hide in).
    texture: float = 1.0

    def scale(self, kind: str) -> FindingScale:
        return self.findings.get(kind, _UNIT_SCALE)


_UNIT_SCALE = FindingScale()

#: ``standard``: the generator as calibrated for raw-pixel difficulty (docs/synthcxr.md); every scale is 1.0,
#: and multiplying by 1.0 is exact, so its files are byte-identical to the generator before tiers existed.
#: ``cpu``: findings made visible enough that the CPU default image tower learns them at 64² within minutes
#: (docs/synthcxr.md, "Difficulty tiers"); findings still sit at random positions, so raw pixels stay weak.
DIFFICULTY_TIERS: dict[str, DifficultyTier] = {
    "standard": DifficultyTier("standard", {}),
    "cpu": DifficultyTier(
        "cpu",
        {
            # kind:                       contrast, size
            "cardiomegaly": FindingScale(1.0, 1.0),
            "enlarged_cardiomediastinum": FindingScale(1.0, 1.15),
            "pleural_effusion": FindingScale(1.0, 1.0),
            "pneumothorax": FindingScale(4.0, 2.5),
            "consolidation": FindingScale(3.0, 1.6),
            "pneumonia": FindingScale(3.0, 1.6),
            "nodule": FindingScale(3.0, 2.5),
            "mass": FindingScale(3.0, 1.6),
            "atelectasis": FindingScale(2.5, 2.0),
            "edema": FindingScale(1.5, 1.0),
            "endotracheal_tube": FindingScale(1.5, 1.5),
            "central_line": FindingScale(2.0, 2.0),
            "rib_fracture": FindingScale(6.0, 3.5),
            "pleural_thickening": FindingScale(3.0, 2.5),
        },
        noise=0.4,
        texture=0.4,
        pose=2.0,
    ),
}

#: Tier names, in the order the CLI lists them.
DIFFICULTY_NAMES: tuple[str, ...] = tuple(DIFFICULTY_TIERS)


def difficulty_tier(name: str) -> DifficultyTier:
    """The tier called ``name``; an unknown name raises ValueError naming it and the known ones."""
    tier = DIFFICULTY_TIERS.get(name)
    if tier is None:
        raise ValueError(f"unknown SynthCXR difficulty {name!r}; expected one of {', '.join(DIFFICULTY_NAMES)}")
    return tier


def _check_tiers() -> None:
    for tier in DIFFICULTY_TIERS.values():
        if not min(tier.noise, tier.blur, tier.texture, tier.pose) > 0:
            raise ValueError(f"difficulty tier {tier.name!r}: image-wide scales must be > 0")
        unknown = sorted(set(tier.findings) - set(FINDINGS))
        if unknown:
            raise ValueError(f"difficulty tier {tier.name!r}: unknown finding kinds {unknown}")
        for kind, scale in tier.findings.items():
            if not (scale.contrast > 0 and scale.size > 0):
                raise ValueError(f"difficulty tier {tier.name!r}: {kind} scales must be > 0, got {scale}")


_check_tiers()


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One finding in one study: the truth behind both the pixels and the report sentence."""

    kind: str
    laterality: Laterality | None
    #: Knowledge-base anatomy id ("right_lower_lobe", "lung_base", ...), or None.
    location: str | None
    severity: str | None
    #: The report states it with uncertainty (label -1.0); it is still drawn in the image.
    hedged: bool
    #: Shape randomness; a follow-up keeps it so a persistent finding looks the same.
    shape_seed: int
    #: Nodule/mass diameter in millimetres (reports quote it).
    size_mm: int | None = None
    #: Rib number (1-based, posterior ribs) for fractures.
    rib: int | None = None

    def __post_init__(self) -> None:
        spec = FINDINGS.get(self.kind)
        if spec is None:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {MASK_CLASS_NAMES}")
        if self.laterality not in spec.lateralities:
            raise ValueError(f"finding {self.kind!r}: laterality {self.laterality!r} not in {spec.lateralities}")
        if spec.severities and self.severity not in spec.severities:
            raise ValueError(f"finding {self.kind!r}: severity {self.severity!r} not in {spec.severities}")

    @property
    def severity_rank(self) -> float:
        """0 for the mildest grade, 1 for the most severe (0.5 when the kind has no grades)."""
        levels = FINDINGS[self.kind].severities
        if not levels or self.severity is None:
            return 0.5
        return levels.index(self.severity) / max(1, len(levels) - 1)


@dataclass(frozen=True)
class ReportStyle:
    """How one hospital writes reports; ``synthetic_reports`` turns it into text."""

    name: str
    impression_header: str  # "IMPRESSION" or "CONCLUSION"
    verbose: bool
    use_abbreviations: bool
    include_indication: bool
    #: Chance that an absent category is explicitly negated ("No pneumothorax.").
    negation_rate: float
    #: Most negated items joined into one sentence ("No pleural effusion or pneumothorax.").
    max_negation_list: int
    #: Chance that a hedgeable finding is reported with uncertainty.
    hedge_rate: float
    #: "severity" (most severe first), "anatomic" (heart, mediastinum, lungs, pleura, bones, devices) or "devices_first".
    sentence_order: str
    numbered_impression: bool
    negatives_first: bool
    #: Seeds the site's synonym subset so two hospitals word the same finding differently.
    vocabulary_seed: int
    #: Fraction of the allowed synonyms of each finding that this site uses (at least one).
    vocabulary_fraction: float


@dataclass(frozen=True)
class SiteProfile:
    """One simulated hospital: acquisition, markers, case mix and report style."""

    site_id: str
    contrast: float
    brightness: float
    gamma: float
    noise_std: float
    #: Gaussian blur sigma in pixels at 64² (scaled with the image size).
    blur_sigma: float
    #: Field of view: >1 zooms in (the body fills more of the image).
    fov_scale: float
    #: Standard deviation of the patient position, in image widths.
    position_jitter: float
    #: Burned-in laterality marker: letter ("L"/"R") and corner ("top_left", ...).
    marker_text: str
    marker_corner: str
    #: Fraction of AP (portable) views; the rest are PA.
    ap_fraction: float
    prevalence: dict[str, float]
    report_style: ReportStyle
    #: Mean number of studies per patient (follow-ups).
    studies_per_patient: float = 1.6


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient body geometry (normalised body coordinates); follow-ups share it."""

    body_half_width: float
    thorax_half_width: float
    mediastinum_half_width: float
    lung_top: float
    dome_right: float
    dome_left: float
    ctr: float  # cardiothoracic ratio without cardiomegaly
    heart_half_height: float
    rib_start: float
    rib_spacing: float
    rib_curve: float
    rib_thickness: float
    clavicle_height: float
    texture_seed: int
    soft_tissue: float
    lung_darkness: float


@dataclass(frozen=True)
class Study:
    """One radiograph: who, when (follow-up index), how (view) and what it shows."""

    site_id: str
    patient_id: str
    study_id: str
    follow_up: int
    view: str  # "PA" | "AP"
    findings: tuple[Finding, ...]
    #: Prior study of the same patient exists / its findings are identical to this one's.
    has_prior: bool = False
    unchanged: bool = False


@dataclass
class RenderedStudy:
    """Pixels and spatial truth of one study."""

    image: np.ndarray  # uint8 [S, S]
    label_mask: np.ndarray  # uint8 [S, S], 0 = background, k = MASK_CLASS_NAMES[k - 1]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # kind → bool [S, S] (full, before overlap)
    bboxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # kind → (x0, y0, x1, y1)


# --------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------


def seeded_rng(*key: int) -> np.random.Generator:
    """A generator keyed by integers: equal keys, equal streams; different keys, independent streams."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


#: Independent random streams: ``seeded_rng(seed, STREAM_X, site, ...)``.
STREAM_SITE, STREAM_PATIENT, STREAM_STUDY, STREAM_DIRICHLET, STREAM_SPLIT = range(5)

_MARKERS: tuple[tuple[str, str], ...] = (
    ("R", "top_left"),
    ("L", "top_right"),
    ("R", "bottom_left"),
    ("L", "bottom_right"),
)
_ORDERS: tuple[str, ...] = ("severity", "anatomic", "devices_first")


def make_site_profiles(num_sites: int, seed: int, dirichlet_alpha: float | None = None) -> list[SiteProfile]:
    """Site ``k``'s acquisition and style depend only on ``(seed, k)``; prevalence may be Dirichlet-skewed.

    Without ``dirichlet_alpha`` every site's prevalence is the base table times a mild per-site
    factor (log-normal, σ = 0.25). With it, each finding's total prevalence is redistributed over the
    sites by ``Dirichlet(alpha · 1)`` weights (label skew: small alpha → a finding concentrates in a
    few hospitals; large alpha → near-IID). That draw couples all sites, so it depends on ``num_sites``.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if dirichlet_alpha is not None and not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    skew = None
    if dirichlet_alpha is not None:
        rng = seeded_rng(seed, STREAM_DIRICHLET, num_sites)
        skew = rng.dirichlet(np.full(num_sites, float(dirichlet_alpha)), size=len(FINDING_SPECS)) * num_sites
    return [_site_profile(k, seed, None if skew is None else skew[:, k]) for k in range(num_sites)]


def _site_profile(k: int, seed: int, skew: np.ndarray | None) -> SiteProfile:
    rng = seeded_rng(seed, STREAM_SITE, k)
    factors = np.exp(rng.normal(0.0, 0.25, size=len(FINDING_SPECS)))
    if skew is not None:
        factors = skew
    prevalence = {
        spec.kind: float(np.clip(spec.base_prevalence * f, 0.0, 0.85))
        for spec, f in zip(FINDING_SPECS, factors, strict=True)
    }
    verbose = bool(rng.random() < 0.5)
    style = ReportStyle(
        name=f"site_{k}_{'verbose' if verbose else 'terse'}",
        impression_header=str(rng.choice(["IMPRESSION", "CONCLUSION"])),
        verbose=verbose,
        use_abbreviations=bool(rng.random() < (0.2 if verbose else 0.7)),
        include_indication=bool(verbose or rng.random() < 0.3),
        negation_rate=float(rng.uniform(0.45, 0.9) if verbose else rng.uniform(0.2, 0.5)),
        max_negation_list=int(rng.integers(1, 4)),
        hedge_rate=float(rng.uniform(0.08, 0.22)),
        sentence_order=str(rng.choice(_ORDERS)),
        numbered_impression=bool(rng.random() < 0.5),
        negatives_first=bool(rng.random() < 0.3),
        vocabulary_seed=int(rng.integers(0, 2**31 - 1)),
        vocabulary_fraction=float(rng.uniform(0.35, 0.8)),
    )
    marker_text, marker_corner = _MARKERS[int(rng.integers(len(_MARKERS)))]
    return SiteProfile(
        site_id=f"site_{k}",
        contrast=float(rng.uniform(0.8, 1.25)),
        brightness=float(rng.uniform(-0.06, 0.06)),
        gamma=float(rng.uniform(0.75, 1.35)),
        noise_std=float(rng.uniform(0.025, 0.06)),
        blur_sigma=float(rng.uniform(0.3, 1.0)),
        fov_scale=float(rng.uniform(0.92, 1.1)),
        position_jitter=float(rng.uniform(0.015, 0.04)),
        marker_text=marker_text,
        marker_corner=marker_corner,
        ap_fraction=float(rng.uniform(0.1, 0.5)),
        prevalence=prevalence,
        report_style=style,
        studies_per_patient=float(rng.uniform(1.3, 1.9)),
    )


# --------------------------------------------------------------------------------------------------
# Patients and studies
# --------------------------------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Body habitus, lung height, diaphragm, heart size and bone layout vary a lot between patients."""
    thorax = rng.uniform(0.28, 0.36)
    dome_right = rng.uniform(0.6, 0.72)
    return PatientAnatomy(
        body_half_width=thorax + rng.uniform(0.06, 0.13),
        thorax_half_width=thorax,
        mediastinum_half_width=rng.uniform(0.04, 0.058),
        lung_top=rng.uniform(0.1, 0.17),
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.005, 0.035),
        ctr=rng.uniform(0.38, 0.5),
        heart_half_height=rng.uniform(0.09, 0.13),
        rib_start=rng.uniform(0.1, 0.15),
        rib_spacing=rng.uniform(0.05, 0.062),
        rib_curve=rng.uniform(0.5, 1.0),
        rib_thickness=rng.uniform(0.012, 0.018),
        clavicle_height=rng.uniform(0.1, 0.16),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        soft_tissue=rng.uniform(0.45, 0.62),
        lung_darkness=rng.uniform(0.28, 0.42),
    )


def plan_patients(num_studies: int, studies_per_patient: float, rng: np.random.Generator) -> list[int]:
    """Studies per patient (1 + Poisson follow-ups, at most 4) until the site's total is reached."""
    if num_studies < 1:
        raise ValueError(f"studies per site must be >= 1, got {num_studies}")
    counts: list[int] = []
    remaining = num_studies
    while remaining > 0:
        n = min(4, 1 + int(rng.poisson(max(0.0, studies_per_patient - 1.0))), remaining)
        counts.append(n)
        remaining -= n
    return counts


def assign_splits(num_patients: int, test_fraction: float, rng: np.random.Generator) -> list[str]:
    """Patient-level split: a patient's studies are all train or all test, never both."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * num_patients))
    if test_fraction > 0 and num_patients >= 2:
        n_test = min(max(n_test, 1), num_patients - 1)
    order = rng.permutation(num_patients)
    splits = ["train"] * num_patients
    for i in order[:n_test]:
        splits[int(i)] = "test"
    return splits


def _zone_for(kind: str, rng: np.random.Generator) -> str:
    if kind in ("pneumonia", "consolidation"):
        return str(rng.choice(["upper", "mid", "lower", "lower"]))
    if kind in ("nodule", "mass"):
        return str(rng.choice(["upper", "upper", "mid", "lower"]))
    raise ValueError(f"finding {kind!r} has no lobe")


_FIXED_LOCATION: dict[str, str | None] = {
    "cardiomegaly": "heart_anatomy",
    "enlarged_cardiomediastinum": "mediastinum_anatomy",
    "pleural_effusion": "lung_base",
    "pneumothorax": "lung_apex",
    "atelectasis": "lung_base",
    "edema": "hilum",
    "endotracheal_tube": "trachea",
    "central_line": None,
    "rib_fracture": "ribs",
    "pleural_thickening": "lung_apex",
}


def new_finding(kind: str, rng: np.random.Generator, hedge_rate: float) -> Finding:
    """Draw laterality, location, severity and certainty of one new finding."""
    spec = FINDINGS[kind]
    laterality = spec.lateralities[int(rng.integers(len(spec.lateralities)))]
    hedged = spec.hedgeable and bool(rng.random() < hedge_rate)
    severity = None
    if spec.severities:
        # Hedged findings are the subtle ones: the mildest grade.
        severity = spec.severities[0] if hedged else spec.severities[int(rng.integers(len(spec.severities)))]
    location = LOBES[(str(laterality), _zone_for(kind, rng))] if kind in _LOBAR else _FIXED_LOCATION[kind]
    size_mm = None
    if kind == "nodule":
        size_mm = int(rng.integers(5, 10) if severity == "subcentimeter" else rng.integers(10, 26))
    elif kind == "mass":
        size_mm = int(rng.integers(30, 46) if severity == "small" else rng.integers(46, 80))
    rib = int(rng.integers(4, 10)) if kind == "rib_fracture" else None
    return Finding(kind, laterality, location, severity, hedged, int(rng.integers(0, 2**31 - 1)), size_mm, rib)


_LOBAR = frozenset({"consolidation", "pneumonia", "nodule", "mass"})


def sample_findings(
    profile: SiteProfile, rng: np.random.Generator, prior: tuple[Finding, ...] | None = None
) -> tuple[Finding, ...]:
    """A first study draws each finding from the site's prevalence; a follow-up mostly keeps the prior's."""
    hedge_rate = profile.report_style.hedge_rate
    chosen: dict[str, Finding] = {}
    if prior is not None:
        for finding in prior:
            spec = FINDINGS[finding.kind]
            if rng.random() >= spec.persistence:
                continue
            if spec.severities and rng.random() < 0.25:
                step = int(rng.choice([-1, 1]))
                rank = spec.severities.index(str(finding.severity)) + step
                if 0 <= rank < len(spec.severities):
                    finding = replace(finding, severity=spec.severities[rank], hedged=False)
            chosen[finding.kind] = finding
    rate = 0.35 if prior is not None else 1.0
    for spec in FINDING_SPECS:
        if spec.kind not in chosen and rng.random() < rate * profile.prevalence[spec.kind]:
            chosen[spec.kind] = new_finding(spec.kind, rng, hedge_rate)
    for keep, drop in _EXCLUSIVE:
        if keep in chosen:
            chosen.pop(drop, None)
    return tuple(chosen[spec.kind] for spec in FINDING_SPECS if spec.kind in chosen)


def same_findings(a: tuple[Finding, ...], b: tuple[Finding, ...]) -> bool:
    """Equal as a radiologist would compare them: kinds, sides, grades and certainty."""

    def key(fs: tuple[Finding, ...]) -> list[tuple]:
        return sorted((f.kind, f.laterality, f.severity, f.hedged, f.location) for f in fs)

    return key(a) == key(b)


def choose_view(profile: SiteProfile, findings: tuple[Finding, ...], rng: np.random.Generator) -> str:
    """Intubated or lined patients are imaged portable (AP) far more often."""
    p_ap = profile.ap_fraction
    if any(f.kind in ("endotracheal_tube", "central_line") for f in findings):
        p_ap = max(p_ap, 0.85)
    return "AP" if rng.random() < p_ap else "PA"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pose:
    """Where the body sits in the image for one exposure."""

    scale: float
    shift_x: float
    shift_y: float
    rotation: float
    inspiration: float


def sample_pose(profile: SiteProfile, view: str, rng: np.random.Generator) -> Pose:
    jitter = profile.position_jitter
    return Pose(
        scale=profile.fov_scale * rng.uniform(0.95, 1.05) * (1.04 if view == "AP" else 1.0),
        shift_x=float(np.clip(rng.normal(0.0, jitter), -2.5 * jitter, 2.5 * jitter)),
        shift_y=float(np.clip(rng.normal(0.0, jitter), -2.5 * jitter, 2.5 * jitter)),
        rotation=float(np.clip(rng.normal(0.0, 0.03), -0.08, 0.08)),
        inspiration=float(rng.uniform(0.94, 1.05)),
    )


@lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _inside(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``signed_distance < 0`` with a linear edge ``2 * width`` wide (anti-aliasing)."""
    return np.clip(0.5 - signed_distance * (0.5 / width), 0.0, 1.0)


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * d[0]), v - (p0[1] + t * d[1]))


def _polyline_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> np.ndarray:
    dist = _segment_distance(u, v, points[0], points[1])
    for p0, p1 in zip(points[1:-1], points[2:], strict=True):
        dist = np.minimum(dist, _segment_distance(u, v, p0, p1))
    return dist


def _unit_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    field_ = gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="reflect")
    return field_ / max(float(field_.std()), 1e-8)


class _Body:
    """The pixel grid mapped into body coordinates, with the patient's fixed structures laid out."""

    def __init__(
        self,
        anatomy: PatientAnatomy,
        pose: Pose,
        size: int,
        view: str,
        findings: dict[str, Finding],
        tier: DifficultyTier = DIFFICULTY_TIERS["standard"],
    ):
        self.tier = tier
        x, y = _pixel_centres(size)
        rotation, shift_x, shift_y = (v * tier.pose for v in (pose.rotation, pose.shift_x, pose.shift_y))
        c, s = math.cos(rotation), math.sin(rotation)
        dx, dy = x - 0.5 - shift_x, y - 0.5 - shift_y
        self.u = 0.5 + (c * dx + s * dy) / pose.scale
        self.v = 0.5 + (-s * dx + c * dy) / pose.scale
        self.size = size
        self.px = 1.0 / (size * pose.scale)  # body units per pixel
        self.edge = 0.6 * self.px
        a = anatomy
        self.anatomy = a
        self.top = a.lung_top
        self.thorax = a.thorax_half_width
        mediastinum_factor = 1.0
        widened = findings.get("enlarged_cardiomediastinum")
        if widened is not None:
            mediastinum_factor = 1.4 + 0.35 * widened.severity_rank + (-0.12 if widened.hedged else 0.0)
            mediastinum_factor *= tier.scale("enlarged_cardiomediastinum").size
        self.med_hw = a.mediastinum_half_width
        self.med_factor = mediastinum_factor
        self.inner = a.mediastinum_half_width + 0.012
        self.domes = {"right": self.top + (a.dome_right - self.top) * pose.inspiration}
        self.domes["left"] = self.domes["right"] + (a.dome_left - a.dome_right)
        ctr = a.ctr
        cardiomegaly = findings.get("cardiomegaly")
        if cardiomegaly is not None:
            ctr = 0.53 + 0.12 * cardiomegaly.severity_rank + (-0.02 if cardiomegaly.hedged else 0.0)
            ctr += _shape_rng(cardiomegaly).uniform(0.0, 0.03)
            ctr *= tier.scale("cardiomegaly").size
        self.ctr = ctr * (1.07 if view == "AP" else 1.0)
        self.lung_fields: dict[str, np.ndarray] = {}
        self.lung_ellipses: dict[str, np.ndarray] = {}
        self.lung_radius: dict[str, np.ndarray] = {}
        for side in ("right", "left"):
            self._lung(side)

    def sign(self, side: str) -> float:
        return -1.0 if side == "right" else 1.0

    def size_scale(self, finding: Finding) -> float:
        """The tier's size scale of this finding's kind (1.0 in ``standard``)."""
        return self.tier.scale(finding.kind).size

    def lung_box(self, side: str) -> tuple[float, float, float, float]:
        """(centre u, half-width, centre v, half-height) of one lung's superellipse."""
        cx = 0.5 + self.sign(side) * (self.inner + self.thorax) / 2
        a = (self.thorax - self.inner) / 2
        bottom = self.domes[side] + 0.07
        return cx, a, (self.top + bottom) / 2, (bottom - self.top) / 2

    def dome(self, side: str) -> np.ndarray:
        cx, a, _, _ = self.lung_box(side)
        return self.domes[side] + 0.09 * ((self.u - cx) / a) ** 2

    def lateral(self, side: str) -> np.ndarray:
        """0 at the lung's medial edge, 1 at the chest wall."""
        return np.clip((self.sign(side) * (self.u - 0.5) - self.inner) / (self.thorax - self.inner), 0.0, 1.0)

    def _lung(self, side: str) -> None:
        cx, a, cy, b = self.lung_box(side)
        r = (np.abs((self.u - cx) / a) ** 2.4 + np.abs((self.v - cy) / b) ** 2.4) ** (1 / 2.4)
        ellipse = _inside((r - 1.0) * min(a, b), self.edge)
        self.lung_radius[side] = r
        self.lung_ellipses[side] = ellipse
        self.lung_fields[side] = ellipse * _inside(self.v - self.dome(side), self.edge)

    def lung_height(self, side: str) -> float:
        return self.domes[side] - self.top

    def heart(self) -> tuple[float, float, float, float]:
        width = self.ctr * 2 * self.thorax
        hh = self.anatomy.heart_half_height * (1.0 + 0.8 * max(0.0, self.ctr - self.anatomy.ctr))
        return 0.5 + 0.14 * width, width / 2, self.domes["left"] - 0.45 * hh, hh


def _shape_rng(finding: Finding) -> np.random.Generator:
    return np.random.default_rng(finding.shape_seed)


def _sides(finding: Finding) -> tuple[str, ...]:
    return ("right", "left") if finding.laterality == "bilateral" else (str(finding.laterality),)


def _zone_centre(body: _Body, side: str, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    cx, a, _, _ = body.lung_box(side)
    height = body.lung_height(side)
    v_frac = {"upper": 0.22, "mid": 0.5, "lower": 0.76}[zone] + rng.uniform(-0.07, 0.07)
    u = cx + body.sign(side) * a * rng.uniform(-0.05, 0.45)
    return float(u), float(body.top + v_frac * height)


class _FindingLayer:
    """Density added by one finding, its truth mask and where it suppresses lung texture."""

    def __init__(self, density: np.ndarray, mask: np.ndarray, no_texture: np.ndarray | None = None):
        self.density = density
        self.mask = mask
        self.no_texture = no_texture


def _draw_effusion(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    frac = {"trace": 0.06, "small": 0.11, "moderate": 0.19, "large": 0.3}[str(f.severity)] * rng.uniform(0.85, 1.2)
    frac *= body.size_scale(f)
    density = np.zeros_like(body.u)
    mask = np.zeros(body.u.shape, dtype=bool)
    for side in _sides(f):
        height = body.lung_height(side)
        level = body.domes[side] - frac * height
        surface = level - rng.uniform(0.2, 0.5) * frac * height * body.lateral(side) ** 2
        fluid = body.lung_ellipses[side] * _inside(surface - body.v, 1.5 * body.px)
        lung = body.lung_fields[side]
        amount = fluid * np.clip(lung * 1.15, 0.0, 1.0)
        density += body.anatomy.lung_darkness * rng.uniform(0.55, 0.8) * amount
        mask |= amount > 0.5
    return _FindingLayer(density, mask)


def _draw_pneumothorax(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    gap = {"tiny": 0.06, "small": 0.1, "moderate": 0.17}[str(f.severity)] * rng.uniform(0.85, 1.15)
    gap *= body.size_scale(f)
    cx, a, cy, b = body.lung_box(side)
    a2, b2 = a * (1 - gap), b * (1 - 0.6 * gap)
    cx2 = cx - body.sign(side) * (a - a2)
    cy2 = cy + (b - b2)
    r2 = (np.abs((body.u - cx2) / a2) ** 2.4 + np.abs((body.v - cy2) / b2) ** 2.4) ** (1 / 2.4)
    collapsed = _inside((r2 - 1.0) * min(a2, b2), body.edge)
    upper = _inside(body.v - (cy + 0.35 * b), 2 * body.px)
    region = np.clip(body.lung_fields[side] - collapsed, 0.0, 1.0) * upper
    line_width = max(0.5 * body.px, 0.004)
    pleural_line = np.exp(-(((r2 - 1.0) * min(a2, b2) / line_width) ** 2)) * upper * body.lung_fields[side]
    density = -0.06 * region + rng.uniform(0.09, 0.13) * pleural_line
    return _FindingLayer(density, region > 0.5, no_texture=region)


def _blob(body: _Body, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    field_ = np.zeros_like(body.u)
    for _ in range(4):
        du, dv = rng.normal(0.0, 0.35 * radius, size=2)
        sigma = radius * rng.uniform(0.4, 0.65)
        field_ += np.exp(-((body.u - centre[0] - du) ** 2 + (body.v - centre[1] - dv) ** 2) / (2 * sigma**2))
    return field_ / max(float(field_.max()), 1e-8)


def _draw_airspace(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    zone = _ZONE_OF_LOBE[str(f.location)][1]
    centre = _zone_centre(body, side, zone, rng)
    radius = (0.045 + 0.035 * f.severity_rank) * rng.uniform(0.85, 1.2)
    radius *= body.size_scale(f)
    shape = _blob(body, centre, radius, rng)
    lung = body.lung_fields[side]
    patchy = 1.0 + 0.35 * _unit_noise(rng, body.size, max(0.8, 0.01 / body.px))
    amp = (0.07 + 0.07 * f.severity_rank) * (body.anatomy.lung_darkness / 0.35) * rng.uniform(0.8, 1.15)
    core = np.clip((shape - 0.35) / 0.4, 0.0, 1.0)
    density = amp * core * np.clip(patchy, 0.3, 1.7) * lung
    return _FindingLayer(density, (shape > 0.5) & (lung > 0.5))


def _draw_lesion(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    zone = _ZONE_OF_LOBE[str(f.location)][1]
    u0, v0 = _zone_centre(body, side, zone, rng)
    radius = max((0.01 + 0.0009 * float(f.size_mm or 0)) * body.size_scale(f), 0.75 * body.px)
    r = np.hypot(body.u - u0, (body.v - v0) * rng.uniform(0.85, 1.15))
    amp = (0.11 if f.kind == "nodule" else 0.14) * rng.uniform(0.85, 1.3)
    disk = _inside(r - radius, body.edge)
    density = amp * disk * (0.55 + 0.45 * np.clip(1 - (r / radius) ** 2, 0.0, 1.0))
    return _FindingLayer(density, r < radius)


def _draw_atelectasis(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    density = np.zeros_like(body.u)
    mask = np.zeros(body.u.shape, dtype=bool)
    for side in _sides(f):
        cx, a, _, _ = body.lung_box(side)
        level = body.domes[side] - rng.uniform(0.035, 0.08)
        slope = rng.uniform(-0.2, 0.2)
        half = max((0.008 + 0.006 * f.severity_rank) * rng.uniform(0.85, 1.2) * body.size_scale(f), 0.75 * body.px)
        centre_line = level + slope * (body.u - cx)
        across = _inside(np.abs(body.u - cx) - 0.6 * a, 2 * body.px)
        band = _inside(np.abs(body.v - centre_line) - half, body.edge) * across * body.lung_fields[side]
        density += (0.09 + 0.05 * f.severity_rank) * rng.uniform(0.8, 1.2) * band
        mask |= band > 0.5
    return _FindingLayer(density, mask)


def _draw_edema(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    lungs = np.clip(body.lung_fields["right"] + body.lung_fields["left"], 0.0, 1.0)
    haze = np.zeros_like(body.u)
    for side in ("right", "left"):
        hu = 0.5 + body.sign(side) * (body.inner + 0.045)
        hv = body.top + 0.45 * body.lung_height(side)
        su, sv = rng.uniform(0.08, 0.11), rng.uniform(0.1, 0.14)
        su, sv = su * body.size_scale(f), sv * body.size_scale(f)
        haze = np.maximum(haze, np.exp(-(((body.u - hu) / su) ** 2 + ((body.v - hv) / sv) ** 2) / 2))
    reticular = 1.0 + 0.4 * _unit_noise(rng, body.size, max(0.6, 0.006 / body.px))
    amp = (0.05 + 0.06 * f.severity_rank) * rng.uniform(0.85, 1.15)
    density = amp * haze * np.clip(reticular, 0.2, 1.8) * lungs
    return _FindingLayer(density, (haze > 0.45) & (lungs > 0.5))


def _line_layer(body: _Body, points: np.ndarray, width: float, amp: float) -> _FindingLayer:
    dist = _polyline_distance(body.u, body.v, points)
    width = max(width, 0.45 * body.px)
    return _FindingLayer(amp * np.exp(-((dist / width) ** 2)), dist < max(1.6 * width, 0.75 * body.px))


def _draw_tube(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    carina = body.top + 0.2 * body.lung_height("right")
    tip = carina - rng.uniform(0.03, 0.08)
    x0 = 0.5 + rng.normal(0.0, 0.006)
    points = np.array([[x0 + rng.normal(0, 0.01), -0.05], [x0, (tip - 0.05) / 2], [x0 + rng.normal(0, 0.004), tip]])
    return _line_layer(body, points, 0.006 * body.size_scale(f), rng.uniform(0.2, 0.3))


def _draw_line(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    clav = body.anatomy.clavicle_height
    tip_v = body.top + rng.uniform(0.25, 0.38) * body.lung_height("right")
    if f.laterality == "right":  # internal jugular approach
        pts = [[0.5 - 0.12, -0.05], [0.5 - 0.07, clav], [0.5 - 0.035, clav + 0.08], [0.5 - 0.03, tip_v]]
    else:  # left subclavian approach
        pts = [[0.5 + 0.3, clav + 0.02], [0.5 + 0.13, clav + 0.05], [0.5 - 0.01, clav + 0.1], [0.5 - 0.03, tip_v]]
    points = np.array(pts) + rng.normal(0.0, 0.008, size=(4, 2))
    return _line_layer(body, points, 0.0045 * body.size_scale(f), rng.uniform(0.15, 0.22))


def _rib_centre(body: _Body, side: str, k: int) -> np.ndarray:
    a = body.anatomy
    t = body.sign(side) * (body.u - 0.5) / body.thorax
    v0 = a.rib_start + k * a.rib_spacing * (0.85 + 0.15 * body.lung_height("right") / 0.5)
    return v0 + 0.07 * t + 0.1 * a.rib_curve * t**2


def _fracture_point(body: _Body, f: Finding) -> tuple[str, int, float, float, float]:
    rng = _shape_rng(f)
    side = str(f.laterality)
    t_break = rng.uniform(0.45, 0.85)
    step = rng.uniform(0.004, 0.009) * (1.0 if f.severity == "acute" else 0.5) * body.size_scale(f)
    return side, int(f.rib or 5) - 1, t_break, step, rng.uniform(0.8, 1.2)


def _draw_fracture(body: _Body, f: Finding) -> _FindingLayer:
    side, k, t_break, _, amp = _fracture_point(body, f)
    a = body.anatomy
    v0 = a.rib_start + k * a.rib_spacing * (0.85 + 0.15 * body.lung_height("right") / 0.5)
    ub = 0.5 + body.sign(side) * t_break * body.thorax
    vb = v0 + 0.07 * t_break + 0.1 * a.rib_curve * t_break**2
    r = np.hypot(body.u - ub, body.v - vb)
    callus = (0.03 if f.severity == "acute" else 0.08) * amp
    density = callus * np.exp(-((r / (0.012 * body.size_scale(f))) ** 2))
    return _FindingLayer(density, r < max(0.028 * body.size_scale(f), 1.5 * body.px))


def _draw_thickening(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    _, a, cy, b = body.lung_box(side)
    width = max(rng.uniform(0.012, 0.02) * body.size_scale(f), 0.8 * body.px) / min(a, b)
    r = body.lung_radius[side]
    rim = _inside(np.abs(r - 1.0 + width / 2) - width / 2, body.edge / min(a, b))
    cap = _inside(body.v - (body.top + rng.uniform(0.18, 0.3) * body.lung_height(side)), 2 * body.px)
    region = rim * cap * (body.lung_ellipses[side] > 0.05)
    return _FindingLayer(rng.uniform(0.08, 0.13) * region, region > 0.5)


def _draw_cardiomegaly(body: _Body, f: Finding) -> _FindingLayer:
    hx, hw, hy, hh = body.heart()
    r = np.hypot((body.u - hx) / hw, (body.v - hy) / hh)
    return _FindingLayer(np.zeros_like(body.u), r < 1.0)


def _draw_mediastinum(body: _Body, f: Finding) -> _FindingLayer:
    _, _, hy, hh = body.heart()
    width = body.med_hw * body.med_factor
    band = (np.abs(body.u - 0.5) < width) & (body.v < hy - 0.5 * hh) & (body.v > body.top - 0.04)
    return _FindingLayer(np.zeros_like(body.u), band)


_DRAW = {
    "cardiomegaly": _draw_cardiomegaly,
    "enlarged_cardiomediastinum": _draw_mediastinum,
    "pleural_effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "consolidation": _draw_airspace,
    "pneumonia": _draw_airspace,
    "nodule": _draw_lesion,
    "mass": _draw_lesion,
    "atelectasis": _draw_atelectasis,
    "edema": _draw_edema,
    "endotracheal_tube": _draw_tube,
    "central_line": _draw_line,
    "rib_fracture": _draw_fracture,
    "pleural_thickening": _draw_thickening,
}


def _anatomy_density(body: _Body, fracture: Finding | None, no_texture: np.ndarray) -> np.ndarray:
    """Soft tissue, lungs, heart, mediastinum, spine, ribs, clavicles and lung texture."""
    a = body.anatomy
    u, v, edge = body.u, body.v, body.edge
    tex_rng = np.random.default_rng(a.texture_seed)
    size = body.size
    soft_texture = _unit_noise(tex_rng, size, max(1.0, 0.08 / body.px))
    lung_texture = _unit_noise(tex_rng, size, max(0.55, 0.009 / body.px))
    body_r = (np.abs((u - 0.5) / a.body_half_width) ** 2.2 + np.abs((v - 0.7) / 0.66) ** 2.2) ** (1 / 2.2)
    neck = _inside(np.abs(u - 0.5) - 0.09, edge) * _inside(v - 0.25, edge)
    torso = np.maximum(_inside((body_r - 1.0) * a.body_half_width, edge), neck)
    density = 0.03 + a.soft_tissue * torso * (1.0 + 0.07 * soft_texture)

    hx, hw, hy, hh = body.heart()
    heart = _inside((np.hypot((u - hx) / hw, (v - hy) / hh) - 1.0) * hh, edge)
    width = body.med_hw * np.where(v < hy - 0.5 * hh, body.med_factor, 1.0)
    knob = 0.018 * np.exp(-(((v - (body.top + 0.12)) / 0.04) ** 2)) * (u > 0.5)
    mediastinum = _inside(np.abs(u - 0.5) - width - knob, edge) * _inside(v - hy, edge)
    lungs = (body.lung_fields["right"] + body.lung_fields["left"]) * (1 - mediastinum) * (1 - 0.7 * heart)
    density -= a.lung_darkness * lungs
    density += 0.04 * heart + 0.06 * mediastinum

    carina = body.top + 0.2 * body.lung_height("right")
    trachea = _inside(np.abs(u - 0.5) - 0.011, edge) * _inside(v - carina, edge)
    density -= 0.09 * trachea
    vertebrae = 1.0 + 0.3 * np.cos(2 * math.pi * v / a.rib_spacing)
    density += 0.06 * _inside(np.abs(u - 0.5) - 0.028, edge) * vertebrae * torso

    bones = np.zeros_like(u)
    for side in ("right", "left"):
        t = body.sign(side) * (u - 0.5) / body.thorax
        span = _inside(np.abs(t - 0.55) - 0.5, 0.02)
        for k in range(10):
            centre = _rib_centre(body, side, k)
            gap = 1.0
            if fracture is not None and fracture.laterality == side and int(fracture.rib or 0) - 1 == k:
                _, _, t_break, step, _ = _fracture_point(body, fracture)
                centre = centre + step * (t > t_break)
                gap = 1.0 - _inside(np.abs(t - t_break) * body.thorax - 0.5 * body.px, 0.3 * body.px)
            half = a.rib_thickness / 2
            bones = np.maximum(bones, _inside(np.abs(v - centre) - half, edge) * span * gap)
        clav_mid = np.array([0.5 + body.sign(side) * 0.035, a.clavicle_height + 0.04])
        clav_lat = np.array([0.5 + body.sign(side) * 0.3, a.clavicle_height])
        clavicle = _inside(_segment_distance(u, v, clav_mid, clav_lat) - 0.011, edge)
        bones = np.maximum(bones, 1.4 * clavicle)
    density += 0.075 * bones * (0.55 + 0.45 * lungs) * torso

    hila = np.zeros_like(u)
    for side in ("right", "left"):
        hu, hv = 0.5 + body.sign(side) * (body.inner + 0.03), body.top + 0.45 * body.lung_height(side)
        hila = np.maximum(hila, np.exp(-np.hypot(u - hu, v - hv) / 0.12))
    markings = (0.03 + 0.05 * hila) * (0.6 + 0.4 * np.clip(lung_texture, -1.5, 1.5)) * body.tier.texture
    density += lungs * markings * (1.0 - no_texture)
    return density


def _marker_glyph(letter: str) -> np.ndarray:
    rows = _GLYPHS.get(letter)
    if rows is None:
        raise ValueError(f"no glyph for laterality marker {letter!r}; expected one of {sorted(_GLYPHS)}")
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)


_GLYPHS = {
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
}


def _burn_marker(image: np.ndarray, letter: str, corner: str) -> None:
    size = image.shape[0]
    scale = max(1, round(size / 64))
    glyph = np.kron(_marker_glyph(letter), np.ones((scale, scale), dtype=bool))
    gh, gw = glyph.shape
    pad = 2 * scale
    if corner not in ("top_left", "top_right", "bottom_left", "bottom_right"):
        raise ValueError(f"unknown marker corner {corner!r}")
    y0 = pad if corner.startswith("top") else size - pad - gh
    x0 = pad if corner.endswith("left") else size - pad - gw
    patch = image[y0 : y0 + gh, x0 : x0 + gw]
    patch[glyph] = 0.95


def render_study(
    anatomy: PatientAnatomy,
    findings: Sequence[Finding],
    profile: SiteProfile,
    view: str,
    image_size: int,
    rng: np.random.Generator,
    difficulty: str = "standard",
) -> RenderedStudy:
    """Draw one radiograph and its masks; ``rng`` drives only this exposure (pose, noise).

    ``difficulty`` names a tier of ``DIFFICULTY_TIERS``; it changes how visible findings are, never
    what is drawn from ``rng`` (same pose and noise stream in every tier).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    tier = difficulty_tier(difficulty)
    by_kind = {f.kind: f for f in findings}
    if len(by_kind) != len(findings):
        raise ValueError(f"one finding per kind per study, got {[f.kind for f in findings]}")
    pose = sample_pose(profile, view, rng)
    body = _Body(anatomy, pose, image_size, view, by_kind, tier)
    layers = {kind: _DRAW[kind](body, f) for kind, f in by_kind.items()}
    no_texture = np.zeros_like(body.u)
    for layer in layers.values():
        if layer.no_texture is not None:
            no_texture = np.maximum(no_texture, layer.no_texture)
    density = _anatomy_density(body, by_kind.get("rib_fracture"), no_texture)
    for kind, layer in layers.items():
        density = density + layer.density * tier.scale(kind).contrast

    image = np.clip((density - 0.3) * profile.contrast + 0.3 + profile.brightness, 0.0, 1.0) ** profile.gamma
    image = gaussian_filter(image, profile.blur_sigma * tier.blur * image_size / 64, mode="nearest")
    image = image + rng.normal(0.0, profile.noise_std * tier.noise, size=image.shape)
    image = np.clip(image, 0.0, 1.0)
    _burn_marker(image, profile.marker_text, profile.marker_corner)
    pixels = np.round(image * 255).astype(np.uint8)

    masks = {kind: _at_least_one_pixel(layer) for kind, layer in layers.items()}
    label_mask = np.zeros((image_size, image_size), dtype=np.uint8)
    bboxes: dict[str, tuple[int, int, int, int]] = {}
    for kind in sorted(masks, key=lambda k: (-int(masks[k].sum()), MASK_INDEX[k])):
        mask = masks[kind]
        if not mask.any():
            raise RuntimeError(f"finding {by_kind[kind]} left an empty mask at {image_size}²; geometry bug")
        label_mask[mask] = MASK_INDEX[kind]
        ys, xs = np.nonzero(mask)
        bboxes[kind] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    for kind in masks:
        if not (label_mask == MASK_INDEX[kind]).any():
            raise RuntimeError(f"finding {kind!r} is hidden under smaller findings in the label mask")
    return RenderedStudy(pixels, label_mask, masks, bboxes)


def _at_least_one_pixel(layer: _FindingLayer) -> np.ndarray:
    """A finding thinner than a pixel (small images) keeps its most affected pixel as its mask."""
    if layer.mask.any():
        return layer.mask
    effect = np.abs(layer.density)
    if layer.no_texture is not None:
        effect = effect + np.abs(layer.no_texture)
    if not effect.any():
        return layer.mask
    mask = np.zeros_like(layer.mask)
    mask[np.unravel_index(int(np.argmax(effect)), effect.shape)] = True
    return mask


def decode_label_mask(label_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Label PNG → {finding kind: bool mask} for the kinds present."""
    return {kind: label_mask == MASK_INDEX[kind] for kind in MASK_CLASS_NAMES if (label_mask == MASK_INDEX[kind]).any()}


def generate_federation(
    out_dir: str | Path,
    num_sites: int,
    studies_per_site: int | Sequence[int],
    image_size: int = 64,
    seed: int = 0,
    dirichlet_alpha: float | None = None,
    test_fraction: float = 0.2,
    difficulty: str = "standard",
) -> list[Path]:
    """Write one SynthCXR site per folder (manifest, images, masks, findings); return the manifests.

    ``difficulty`` is a tier of ``DIFFICULTY_TIERS`` (``standard`` or ``cpu``); an unknown name raises
    ValueError before anything is written.
    """
    difficulty_tier(difficulty)
    # The writer imports the report generator, which imports this module: resolve at call time.
    from mlip_fed.data.manifest_writer import write_federation

    return write_federation(
        out_dir,
        num_sites=num_sites,
        studies_per_site=studies_per_site,
        image_size=image_size,
        seed=seed,
        dirichlet_alpha=dirichlet_alpha,
        test_fraction=test_fraction,
        difficulty=difficulty,
    )
