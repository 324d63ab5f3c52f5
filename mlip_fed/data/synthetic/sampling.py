"""SynthCXR sampling: site profiles, patients, studies and their findings, from keyed random streams.

Randomness: one ``numpy.random.Generator`` per (seed, stream, site, patient[, study]) built from a
``SeedSequence`` (``seeded_rng``), so adding sites or studies never changes the ones generated before.
Nothing here draws pixels (``render``) or words (``reports``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mlip_fed.data.synthetic.findings import EXCLUSIVE_KINDS, FINDING_SPECS, FINDINGS, LOBES, Finding

# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportStyle:
    """How one hospital writes reports; ``reports`` turns it into text."""

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
    for keep, drop in EXCLUSIVE_KINDS:
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
