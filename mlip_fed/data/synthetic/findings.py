"""SynthCXR's finding table, its difficulty tiers and the ``Finding`` record: what can be drawn and reported.

One row per finding kind (``FINDING_SPECS``): its CheXpert categories, sides, grades, prevalence and
persistence. The mask label value of a kind is its row's index. ``DIFFICULTY_TIERS`` scale how visible
each kind is at render time only. Both tables are checked at import, so a bad row fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

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
ZONE_OF_LOBE: dict[str, tuple[str, str]] = {lobe: key for key, lobe in LOBES.items()}

#: Kinds that never co-occur in one study (the first one listed wins).
EXCLUSIVE_KINDS: tuple[tuple[str, str], ...] = (("pneumonia", "consolidation"), ("mass", "nodule"))


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
