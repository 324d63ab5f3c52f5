"""SynthCXR report writer: radiology text and its CheXpert labels, from the same statements.

Every sentence is built from a *statement* — which CheXpert categories it mentions and with what
certainty — and the ground-truth labels are the CheXpert aggregation of those statements, so the
labels are exactly what the text says (1.0 stated, 0.0 negated, -1.0 hedged, NaN not mentioned).
The words come from the shared knowledge base: each finding kind lists the KB surface forms it may
use (checked against the KB at load, so a renamed synonym fails loudly), each site uses its own
subset of them, its own headers, verbosity, negation habits and sentence order.

The language is kept natural but unambiguous for a rule-based labeler: one certainty per sentence,
negation lists of at most three short items, hedges that name only the finding's primary category,
and no phrases whose CheXpert reading is contested ("lungs are clear", "stable heart size").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlip_fed.data.synthetic.findings import FINDINGS, LOBES, Finding
from mlip_fed.data.synthetic.sampling import ReportStyle, Study
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, KnowledgeBase, load_knowledge_base

Certainty = str  # "positive" | "negative" | "uncertain"


@dataclass(frozen=True)
class Statement:
    """One sentence and the CheXpert mentions it carries."""

    text: str
    mentions: tuple[tuple[str, Certainty], ...]


@dataclass(frozen=True)
class WrittenReport:
    text: str
    #: 14 CheXpert labels in ``CHEXPERT_CATEGORIES`` order: 1.0, 0.0, -1.0 or NaN.
    labels: tuple[float, ...]
    statements: tuple[Statement, ...]


# Surface forms the writer may use per finding kind; each must be a KB surface form of a concept in
# the kind's primary CheXpert category (checked at first use, so KB edits that drop one fail loudly).
_NOUNS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly", "cardiac enlargement", "enlarged cardiac silhouette", "enlargement of the heart"),
    "enlarged_cardiomediastinum": (
        "widened mediastinum",
        "mediastinal widening",
        "enlarged cardiomediastinal silhouette",
        "widening of the mediastinum",
    ),
    "pleural_effusion": ("pleural effusion", "effusion"),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "pneumonia": ("pneumonia",),
    "nodule": ("nodule", "pulmonary nodule", "lung nodule"),
    "mass": ("mass", "lung mass", "pulmonary mass"),
    "atelectasis": ("atelectasis", "subsegmental atelectasis", "platelike atelectasis", "linear atelectasis"),
    "edema": ("pulmonary edema", "edema", "interstitial edema", "pulmonary vascular congestion"),
    "endotracheal_tube": ("endotracheal tube", "et tube"),
    "central_line": ("central venous catheter", "central line", "central venous line"),
    "rib_fracture": ("fracture", "rib fracture"),
    "pleural_thickening": ("pleural thickening", "apical pleural thickening", "apical capping"),
    # The Lung Opacity nouns that accompany consolidation and pneumonia.
    "_opacity": ("opacity", "airspace opacity", "hazy opacity", "parenchymal opacity", "pulmonary opacity"),
}
_NOUN_CATEGORY = {kind: spec.categories[0] for kind, spec in FINDINGS.items()} | {"_opacity": "Lung Opacity"}
#: Findings whose KB abbreviation a site with ``use_abbreviations`` may write (in capitals).
_ABBREVIATED = ("pneumothorax", "endotracheal_tube")
_PLURAL = {"pleural effusion": "pleural effusions", "effusion": "effusions"}
#: How a lower-case KB form is written in a report.
_DISPLAY = {"et tube": "ET tube"}

#: Negation phrases per absent category: list items ("No A, B, or C.") or whole sentences.
_NEGATION_ITEMS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": ("pleural effusion", "effusion"),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("focal consolidation", "consolidation"),
    "Lung Opacity": ("focal airspace opacity", "airspace opacity"),
    "Pneumonia": ("pneumonia",),
    "Edema": ("pulmonary edema", "edema"),
    "Atelectasis": ("atelectasis",),
    "Lung Lesion": ("pulmonary nodule", "lung mass"),
    "Fracture": ("displaced rib fracture", "acute fracture"),
    "Pleural Other": ("pleural thickening",),
}
_NEGATION_SENTENCES: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Heart size is normal.", "Normal heart size.", "The cardiac silhouette is normal in size."),
    "Enlarged Cardiomediastinum": (
        "The mediastinal contours are normal.",
        "Normal cardiomediastinal silhouette.",
        "The cardiomediastinal silhouette is within normal limits.",
    ),
}
_HEDGES: tuple[str, ...] = (
    "Possible {np}.",
    "Cannot exclude {np}.",
    "Findings may represent {np}.",
    "Questionable {np}.",
    "{Np} is not excluded.",
)
_NORMAL = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
)
_UNCHANGED = ("Unchanged from prior.", "No significant interval change.", "Stable appearance compared with prior.")
_INDICATIONS = ("Cough.", "Shortness of breath.", "Fever.", "Chest pain.", "Dyspnea.", "Pre-operative evaluation.")
_ORDINAL = {i: f"{i}{'st' if i == 1 else 'nd' if i == 2 else 'rd' if i == 3 else 'th'}" for i in range(1, 13)}
_ANATOMIC_ORDER = (
    "cardiomegaly",
    "enlarged_cardiomediastinum",
    "edema",
    "consolidation",
    "pneumonia",
    "nodule",
    "mass",
    "atelectasis",
    "pleural_effusion",
    "pneumothorax",
    "pleural_thickening",
    "rib_fracture",
    "endotracheal_tube",
    "central_line",
)
_DEVICES = ("endotracheal_tube", "central_line")


_CHECKED: dict[int, tuple[KnowledgeBase, dict]] = {}
_SITE_WORDS: dict[tuple[ReportStyle, int], dict[str, tuple[str, ...]]] = {}


def _vocabulary(kb: KnowledgeBase) -> dict:
    """Check every phrase the writer uses against the KB (once per KB); return the lobe concepts."""
    cached = _CHECKED.get(id(kb))
    if cached is not None and cached[0] is kb:
        return cached[1]
    forms_by_category: dict[str, set[str]] = {}
    for concept in kb.concepts:
        if concept.chexpert_category is not None:
            forms_by_category.setdefault(concept.chexpert_category, set()).update(concept.surface_forms)
    for kind, forms in _NOUNS.items():
        category = _NOUN_CATEGORY[kind]
        missing = [f for f in forms if f not in forms_by_category.get(category, set())]
        if missing:
            raise ValueError(f"SynthCXR writer ({kind}): no KB concept of category {category!r} has forms {missing}")
    for category, items in _NEGATION_ITEMS.items():
        for item in items:
            if not any(form in item for form in forms_by_category.get(category, set())):
                raise ValueError(f"SynthCXR writer: negation item {item!r} names no KB form of {category!r}")
    for category, sentences in _NEGATION_SENTENCES.items():
        for sentence in sentences:
            if not any(form in sentence.lower() for form in forms_by_category.get(category, set())):
                raise ValueError(f"SynthCXR writer: negation {sentence!r} names no KB form of {category!r}")
    lobes = {lobe: kb.concept(lobe) for lobe in LOBES.values()}
    abbreviations = {}
    for kind in _ABBREVIATED:
        found = [
            a
            for c in kb.for_category(_NOUN_CATEGORY[kind])
            for a in c.abbreviations
            if _NOUNS[kind][0] in c.surface_forms
        ]
        abbreviations[kind] = found[0].upper() if found else None
    result = {"lobes": lobes, "abbreviations": abbreviations}
    _CHECKED[id(kb)] = (kb, result)
    return result


def site_vocabulary(style: ReportStyle, kb: KnowledgeBase | None = None) -> dict[str, tuple[str, ...]]:
    """The subset of each finding's allowed nouns this site uses (fixed per site, at least one)."""
    kb = kb or load_knowledge_base()
    _vocabulary(kb)
    key = (style, id(kb))
    if key in _SITE_WORDS:
        return _SITE_WORDS[key]
    rng = np.random.default_rng(style.vocabulary_seed)
    chosen: dict[str, tuple[str, ...]] = {}
    for kind, forms in sorted(_NOUNS.items()):
        n = max(1, int(round(style.vocabulary_fraction * len(forms))))
        chosen[kind] = tuple(forms[i] for i in sorted(rng.permutation(len(forms))[:n]))
    if style.use_abbreviations:
        for kind, abbreviation in _vocabulary(kb)["abbreviations"].items():
            if abbreviation:
                chosen[kind] = chosen[kind] + (abbreviation,)
    _SITE_WORDS[key] = chosen
    return chosen


def aggregate_labels(statements: Sequence[Statement]) -> tuple[float, ...]:
    """CheXpert aggregation: positive beats uncertain beats negative; No Finding by CheXpert's rule."""
    seen: dict[str, set[str]] = {}
    for statement in statements:
        for category, certainty in statement.mentions:
            seen.setdefault(category, set()).add(certainty)
    labels = {c: math.nan for c in CHEXPERT_CATEGORIES}
    for category, certainties in seen.items():
        if "positive" in certainties:
            labels[category] = 1.0
        elif "uncertain" in certainties:
            labels[category] = -1.0
        else:
            labels[category] = 0.0
    findings = [c for c in CHEXPERT_CATEGORIES if c not in ("No Finding", "Support Devices")]
    if not any(labels[c] in (1.0, -1.0) for c in findings):
        labels["No Finding"] = 1.0
    return tuple(labels[c] for c in CHEXPERT_CATEGORIES)


class _Writer:
    def __init__(self, style: ReportStyle, rng: np.random.Generator, kb: KnowledgeBase):
        self.style = style
        self.rng = rng
        self.kb = kb
        self.words = site_vocabulary(style, kb)
        self.lobes = _vocabulary(kb)["lobes"]

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def noun(self, kind: str, plural: bool = False) -> str:
        word = _DISPLAY.get(w := self.pick(self.words[kind]), w)
        return _PLURAL.get(word, word) if plural else word

    def lobe(self, lobe_id: str) -> str:
        concept = self.lobes[lobe_id]
        if self.style.use_abbreviations and concept.abbreviations and self.rng.random() < 0.7:
            return concept.abbreviations[0].upper()
        return concept.name

    def side(self, f: Finding) -> str:
        return str(f.laterality)

    # ---- one finding, stated with certainty -------------------------------------------------------
    def positive(self, f: Finding, *, short: bool) -> Statement:
        spec = FINDINGS[f.kind]
        mentions = tuple((c, "positive") for c in spec.categories)
        sev = f.severity or ""
        k = f.kind
        if k in ("cardiomegaly", "enlarged_cardiomediastinum"):
            noun = self.noun(k)
            if noun.startswith(("enlarged", "widened")):
                phrase = f"{_adverb(sev)} {noun}"
            else:
                phrase = f"{sev} {noun}"
            text = phrase if short or not self.style.verbose else f"there is {phrase}"
        elif k == "pleural_effusion":
            bilateral = f.laterality == "bilateral"
            text = f"{sev} {self.side(f)} {self.noun(k, plural=bilateral)}"
            if self.style.verbose and not short:
                text = f"there are {text}" if bilateral else f"there is a {text}"
        elif k == "pneumothorax":
            text = f"{sev} {self.side(f)} apical {self.noun(k)}"
            if self.style.verbose and not short:
                text = f"there is a {text}"
        elif k in ("consolidation", "pneumonia"):
            where = self.lobe(str(f.location))
            opacity = self.noun("_opacity")
            if k == "pneumonia" and short:
                text, mentions = f"{where} pneumonia", (("Pneumonia", "positive"),)
            elif short or not self.style.verbose:
                text = f"{where} {opacity} and consolidation"
                mentions = (("Consolidation", "positive"), ("Lung Opacity", "positive"))
            else:
                text = f"there is {sev} {opacity} with consolidation in the {where}"
                mentions = (("Consolidation", "positive"), ("Lung Opacity", "positive"))
        elif k in ("nodule", "mass"):
            size = f"{f.size_mm} mm" if k == "nodule" else f"{(f.size_mm or 0) / 10:.1f} cm"
            text = f"{size} {self.noun(k)} in the {self.lobe(str(f.location))}"
        elif k == "atelectasis":
            where = "bibasilar" if f.laterality == "bilateral" else f"{self.side(f)} basilar"
            text = f"{where} {self.noun(k)}" if short else f"{sev} {where} {self.noun(k)}"
        elif k == "edema":
            text = f"{sev} {self.noun(k)}"
            if self.style.verbose and not short:
                text += " with a perihilar predominance"
        elif k == "endotracheal_tube":
            noun = self.noun(k)
            text = noun if short else f"{noun} tip terminates {int(self.rng.integers(3, 7))} cm above the carina"
        elif k == "central_line":
            route = "right internal jugular" if f.laterality == "right" else "left subclavian"
            text = f"{route} {self.noun(k)}" + ("" if short else " with tip in the superior vena cava")
        elif k == "rib_fracture":
            noun = self.noun(k)
            age = str(f.severity)
            if noun == "fracture":
                text = f"{age} fracture of the {self.side(f)} {_ORDINAL[int(f.rib or 5)]} rib"
            else:
                text = f"{age} {self.side(f)} {_ORDINAL[int(f.rib or 5)]} posterior {noun}"
        elif k == "pleural_thickening":
            noun = self.noun(k)
            text = f"{self.side(f)} {noun}" if "apical" in noun else f"{self.side(f)} apical {noun}"
        else:  # pragma: no cover - the table and this writer are kept in step by tests
            raise ValueError(f"no report template for finding {k!r}")
        return Statement(_sentence(text), mentions)

    def hedged(self, f: Finding) -> Statement:
        spec = FINDINGS[f.kind]
        noun = self.noun(f.kind)
        if f.kind == "pneumonia":
            np_ = f"early {noun}"
        elif f.kind in ("pleural_effusion", "pneumothorax", "atelectasis"):
            np_ = (
                f"{f.severity} {f.laterality} {noun}"
                if f.laterality != "bilateral"
                else f"{f.severity} bilateral {noun}"
            )
        elif f.kind in ("consolidation", "nodule"):
            # Location first: a post-trigger ("... is not excluded") must sit right after the noun.
            np_ = f"{self.lobe(str(f.location))} {noun}"
        elif f.kind == "rib_fracture":
            np_ = f"{f.laterality} rib fracture" if noun == "fracture" else f"{f.laterality} {noun}"
        elif noun.startswith(("enlarged", "widened")):
            np_ = f"{_adverb(str(f.severity))} {noun}"
        else:
            np_ = f"{f.severity} {noun}" if f.severity else noun
        template = self.pick(_HEDGES)
        text = template.replace("{Np}", np_[:1].upper() + np_[1:]).replace("{np}", np_)
        return Statement(_sentence(text), ((spec.categories[0], "uncertain"),))

    def negations(self, absent: Sequence[str]) -> list[Statement]:
        out: list[Statement] = []
        items: list[tuple[str, str]] = []
        for category in absent:
            if self.rng.random() >= self.style.negation_rate:
                continue
            if category in _NEGATION_SENTENCES:
                out.append(Statement(self.pick(_NEGATION_SENTENCES[category]), ((category, "negative"),)))
            else:
                items.append((category, self.pick(_NEGATION_ITEMS[category])))
        self.rng.shuffle(items)
        step = self.style.max_negation_list
        for i in range(0, len(items), step):
            group = items[i : i + step]
            words = [w for _, w in group]
            if len(words) == 1:
                listed = words[0]
            elif len(words) == 2:
                listed = f"{words[0]} or {words[1]}"
            else:
                listed = f"{', '.join(words[:-1])}, or {words[-1]}"
            out.append(Statement(f"No {listed}.", tuple((c, "negative") for c, _ in group)))
        return out


def _adverb(severity: str) -> str:
    return {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}.get(severity, severity)


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text[:1].upper() + text[1:] + "."


def _order(findings: Sequence[Finding], style: ReportStyle) -> list[Finding]:
    if style.sentence_order == "severity":
        return sorted(findings, key=lambda f: (-f.severity_rank, _ANATOMIC_ORDER.index(f.kind)))
    if style.sentence_order == "devices_first":
        return sorted(findings, key=lambda f: (f.kind not in _DEVICES, _ANATOMIC_ORDER.index(f.kind)))
    return sorted(findings, key=lambda f: _ANATOMIC_ORDER.index(f.kind))


def write_report(
    study: Study, style: ReportStyle, rng: np.random.Generator, kb: KnowledgeBase | None = None
) -> WrittenReport:
    """FINDINGS and IMPRESSION/CONCLUSION text for ``study`` in the site's style, with its labels."""
    kb = kb or load_knowledge_base()
    w = _Writer(style, rng, kb)
    ordered = _order(study.findings, style)
    covered = {c for f in study.findings for c in FINDINGS[f.kind].categories}
    absent = [c for c in CHEXPERT_CATEGORIES if c not in covered and c not in ("No Finding", "Support Devices")]

    body: list[Statement] = []
    for f in ordered:
        body.append(w.hedged(f) if f.hedged else w.positive(f, short=False))
    negatives = w.negations(absent)
    body = negatives + body if style.negatives_first else body + negatives
    if not body:
        body = [Statement(w.pick(_NORMAL), ())]

    impression: list[Statement] = []
    if study.has_prior and study.unchanged:
        impression.append(Statement(w.pick(_UNCHANGED), ()))
    diseases = [f for f in ordered if f.kind not in _DEVICES]
    for f in diseases:
        impression.append(w.hedged(f) if f.hedged else w.positive(f, short=True))
    if not diseases:
        impression.append(Statement(w.pick(_NORMAL), ()))

    sections: list[str] = []
    if style.verbose:
        view = "portable AP view" if study.view == "AP" else "PA view"
        sections.append(f"EXAMINATION: Chest radiograph, {view}.")
    if style.include_indication:
        sections.append(f"INDICATION: {w.pick(_INDICATIONS)}")
    if style.verbose or study.has_prior:
        sections.append(f"COMPARISON: {'Prior radiograph.' if study.has_prior else 'None.'}")
    sections.append("FINDINGS: " + " ".join(s.text for s in body))
    if style.numbered_impression and len(impression) > 1:
        listed = "\n".join(f"{i}. {s.text}" for i, s in enumerate(impression, start=1))
        sections.append(f"{style.impression_header}:\n{listed}")
    else:
        sections.append(f"{style.impression_header}: " + " ".join(s.text for s in impression))
    statements = tuple(body + impression)
    return WrittenReport("\n\n".join(sections), aggregate_labels(statements), statements)
