"""A CheXpert-compatible report labeler built on the shared knowledge base.

It follows the CheXpert labeler's pipeline (mention extraction, then pre-negation uncertainty →
negation → post-negation uncertainty, then per-report aggregation) but replaces the dependency
parser with NegEx-style trigger scopes inside clauses, so it needs no parser, no model and no
download. Mention phrases come only from the knowledge base: a site that adds a synonym there
changes the labeler, the synthetic generator and the prompts together.

Two extensions over a plain keyword matcher, both driven by the KB's ``attributes``:

* ``neutral_forms`` ("heart size", "cardiac silhouette", "pulmonary vasculature", "lungs") name
  a structure, not a finding. They become a mention only next to a qualifier: a positive one
  from the concept's ``positive_qualifiers`` ("enlarged"), a normal one ("normal", "clear",
  "within normal limits") which negates, or a stability word ("stable", "unchanged") which CheXpert
  reads as uncertain. Unqualified, they are plain anatomy.
* Laterality and location are read from the clause around each mention, so text swapping and
  the local alignment objective can edit or attend to them.

Rules for real report language (issue #17; the choices are argued in ``docs/labeler.md``):

* Negation and normality stated after the mention reach through a coordinated subject ("heart
  size and pulmonary vascular engorgement appear within limits of normal", "A, B, and C are not
  seen"); a bare comma ("congestion, effusions are not seen") does not make a list.
* Resolution: "resolved", "cleared", "clearing of", "no longer seen" negate (as in CheXpert);
  partial resolution ("resolving", "nearly resolved", "partial clearing of") is uncertain.
  History cues ("history of", "prior", "previous") drop acute-process mentions.
* Attribution: an appearance (Lung Lesion, Lung Opacity) that the report attributes to something
  else ("represents a healing rib fracture", "due to overlying soft tissue", "consistent with
  granulomatous disease", also from the next sentence: "This represents ...") is dropped in favour
  of what it is attributed to; hedged, it becomes uncertain when the explanation denies a lung
  finding ("may be artifact") and stays when it only characterises one ("likely a granuloma").

Rules found by writing typical phrasings per category rather than reading the dev file
(``tests/test_labeler_phrasings.py``):

* A finding phrase that starts inside an anatomy phrase wins ("left chest tube", "right lung lesion").
* "Prior"/"previous"/"old" in a comparison ("the prior effusion has increased", "since prior, ...")
  are not history cues.
* A negated list ends at a comma after its last and/or ("no effusion or consolidation, bibasilar
  atelectasis") or before an asserting word ("..., only mild atelectasis").
* "Lungs are hyperinflated but clear" negates opacity; a tip in the SVC/right atrium implies a
  catheter; "insensitive for", "mimics" and "to document resolution" are not findings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, KnowledgeBase, load_knowledge_base
from mlip_fed.knowledge.mentions import Certainty, Laterality, Mention
from mlip_fed.knowledge.report import NON_FINDING_SECTIONS, Sentence, split_clauses, split_report

POSITIVE, NEGATIVE, UNCERTAIN, BLANK = 1.0, 0.0, -1.0, math.nan

#: Concepts whose positive/uncertain mention also adds an uncertain Cardiomegaly (CheXpert's chf rule).
CHF_CONCEPTS: frozenset[str] = frozenset({"heart_failure"})
_NO_FINDING_EXEMPT = frozenset({"No Finding", "Support Devices"})

# ----------------------------------------------------------------------------------------------
# Trigger vocabularies (lower-case regex fragments). Ordered as NegBio applies them.
# ----------------------------------------------------------------------------------------------
#: Before the mention; they contain negation words, so they must win over plain negation.
_PRE_NEG_UNCERTAIN = (
    r"cannot\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+)?(?:exclude|excluded|rule\s+out|ruled\s+out)",
    r"can\s*not\s+(?:exclude|rule\s+out)",
    r"can'?t\s+(?:exclude|rule\s+out)",
    r"could\s+not\s+(?:exclude|rule\s+out)",
    r"(?:difficult|unable|impossible|hard)\s+to\s+(?:exclude|rule\s+out)",
    r"not\s+(?:able\s+to\s+)?(?:exclude|rule\s+out)",
    r"no\s+(?:evidence|way)\s+to\s+(?:exclude|rule\s+out)",
    r"(?:may|might|could)\s+not\s+be\s+excluded",
    r"no\s+new",
    r"without\s+new",
    r"rule\s+out",
    r"r/o",
    r"to\s+exclude",
    r"evaluate\s+for",
    r"question\s+of",
    # A plan to exclude is a hedge, whatever comes before it ("follow-up ... and exclude underlying mass").
    r"exclude",
)
#: After the mention; checked before negation for the same reason.
_POST_NEG_UNCERTAIN = (
    r"(?:is|are|was|were)?\s*(?:not|cannot\s+be|can\s*not\s+be|could\s+not\s+be|can'?t\s+be)"
    r"(?:\s+(?:entirely|completely|definitely|totally))?\s+(?:excluded|ruled\s+out)",
    r"(?:is|are)?\s*(?:difficult|hard)\s+to\s+exclude",
    r"(?:may|might|could)\s+(?:not\s+)?be\s+(?:excluded|present|seen|represent)",
)
_PRE_NEGATION = (
    r"no",
    r"not",
    r"without",
    r"negative\s+for",
    r"free\s+of",
    r"clear\s+of",
    r"absence\s+of",
    r"absent",
    r"resolved",
    r"resolution\s+of",
    r"cleared",
    r"clearing\s+of",
    r"disappearance\s+of",
    r"removal\s+of",
    r"rather\s+than",
    r"nor",
    r"never",
    r"deny|denies",
    r"ruled\s+out",
    r"excluded",
    # Something that imitates a finding is not it ("a skin fold mimics a pneumothorax").
    r"mimic(?:s|king|ked)?",
    r"simulat(?:es|ing|ed)",
    r"(?:not\s+to\s+be|should\s+not\s+be)\s+(?:mistaken|confused)\s+(?:for|with)",
    r"no\s+(?:evidence|sign|signs|findings?|suggestion|radiographic\s+evidence)\s+(?:of|for|to\s+suggest)",
)
_POST_NEGATION = (
    r"(?:is|are|was|were|has\s+been|have\s+been)?\s*(?:not|no\s+longer)\b",
    r"(?:is|are|was|were|has|have)?\s*(?:been\s+)?(?:resolved|removed|absent|cleared|withdrawn)",
    r"(?:is|are)?\s*negative",
    r"(?:has|have)\s+(?:since\s+)?(?:resolved|cleared|disappeared)",
)
#: Words that make a mention uncertain when they precede it in the clause.
_PRE_UNCERTAIN = (
    # First, so that it wins over a bare "may": "may be due to atelectasis" keeps its hedge across
    # the attribution verb, which is otherwise a terminator.
    r"(?:may|might|could)\s+(?:also\s+)?(?:be\s+)?(?:due|secondary|related|attributable)\s+to",
    r"possible",
    r"possibly",
    r"probable",
    r"probably",
    r"likely",
    r"presumed",
    r"presumably",
    r"suspected",
    r"suspect",
    r"suspicious\s+(?:for|of)",
    r"suggestive\s+of",
    r"suggests?",
    r"suggesting",
    r"concerning\s+for",
    r"concern\s+for",
    r"worrisome\s+for",
    r"questionable",
    r"equivocal",
    r"indeterminate",
    r"uncertain",
    r"may",
    r"might",
    r"could",
    r"consider",
    r"considered",
    r"differential\s+(?:diagnosis\s+)?(?:includes?|of)",
    r"versus",
    r"vs\.?",
    r"and/or",
    r"or\s+early",
    r"cannot\s+be\s+determined",
    r"not\s+certain",
    r"raising\s+the\s+possibility",
    # A purpose clause is a plan, not a finding ("CT can be performed to identify a small nodule").
    r"to\s+(?:further\s+)?(?:identify|evaluate|assess|characteri[sz]e|detect|look\s+for|search\s+for)",
    r"represent",
    r"representing",
    # Statements about the test, not the patient ("radiographs are insensitive for rib fractures").
    r"(?:in)?sensitive\s+(?:for|to|in)",
    r"detection\s+of",
)
_POST_UNCERTAIN = (
    r"(?:is|are)\s+(?:also\s+|still\s+|less\s+|more\s+)?"
    r"(?:possible|suspected|questioned|likely|probable|not\s+certain|uncertain|considered)",
    r"versus",
    r"vs\.?",
    r"and/or",
    r"(?:is|are)?\s*(?:not\s+)?(?:excluded|ruled\s+out)",
    r"\?",
    r"(?:can|could|may|might)\s+(?:not\s+)?be",
)
#: Trigger look-alikes that never negate ("no change in the effusion").
_PSEUDO = (
    r"no\s+(?:significant\s+|interval\s+|appreciable\s+|substantial\s+)?(?:change|increase|worsening|progression)",
    r"not\s+(?:only|necessarily|significantly\s+changed|changed|increased)",
    r"without\s+(?:significant\s+|interval\s+)?(?:change|increase|worsening)",
    r"no\s+longer\s+(?:in\s+place)",
    r"gram\s+negative",
    # "age-indeterminate fracture" dates a fracture that is there; it does not doubt it.
    r"age[-\s]+indeterminate",
    # A follow-up "to document resolution of the pneumonia" is about a finding that is there now.
    r"(?:ensure|document|confirm|demonstrate|assess|evaluate\s+for|check\s+for)\s+(?:its\s+|the\s+|complete\s+)*"
    r"(?:resolution|clearing)",
)
#: Normal-ish qualifiers: next to a neutral form they negate it ("heart size is normal").
_NORMAL_QUALIFIERS = (
    r"(?:at\s+|near\s+)?(?:the\s+)?(?:upper|high|top)(?:\s+limits?\s+of|\s+end\s+of|-|\s+)?\s*normal",
    r"within\s+(?:the\s+)?(?:normal\s+limits|limits\s+of\s+normal|normal\s+range)",
    r"normal(?:\s+(?:in|for)\s+(?:size|contour|caliber|configuration|appearance))?",
    r"unremarkable",
    r"clear",
    r"wnl",
    r"not\s+(?:enlarged|widened|prominent|increased)",
    r"negative",
    r"(?:well|fully)\s+(?:expanded|aerated|inflated)",
)
_STABLE_QUALIFIERS = (r"stable", r"unchanged", r"similar", r"not\s+significantly\s+changed", r"grossly\s+stable")
#: Resolution under way: the finding is going, its residue unstated. CheXpert has no rule for it
#: (it would say positive); we label it uncertain, checked before negation, which owns the
#: complete forms ("resolved", "cleared", "resolution of", "no longer seen").
_PRE_PARTIAL_RESOLUTION = (
    r"resolving",
    r"clearing(?!\s+of)",
    r"(?:nearly|almost|largely|mostly|partially|partly|incompletely|not\s+(?:completely|entirely|fully))\s+"
    r"(?:resolved|cleared)",
    r"(?:partial|incomplete|near[-\s]?complete|near[-\s]?total|nearly\s+complete|almost\s+complete|some|slow|"
    r"partially|ongoing|continued)\s+(?:resolution|clearing)\s+of",
)
_POST_PARTIAL_RESOLUTION = (
    r"(?:is|are|was|were)?\s*(?:slowly\s+|gradually\s+)?(?:resolving|clearing)",
    r"(?:is|are|was|were|has|have)\s+(?:been\s+)?(?:nearly|almost|largely|mostly|partially|partly|incompletely|"
    r"not\s+(?:completely|entirely|fully))\s+(?:resolved|cleared)",
)
#: A predicate after the subject that calls it normal ("... appear within limits of normal").
#: Bare "normal"/"unremarkable" need a copula; "within normal limits" may stand without one.
_POST_NORMAL = (
    r"(?:is|are|was|were|appears?|appeared|remains?|remained|seems?|looks?)\s+"
    r"(?:(?:now|again|otherwise|grossly|both|all|still|also|essentially|stable\s+and)\s+)*"
    r"(?:within\s+(?:the\s+)?(?:normal\s+limits|limits\s+of\s+normal|normal\s+range)|normal|unremarkable|wnl)",
    r"within\s+(?:the\s+)?(?:normal\s+limits|limits\s+of\s+normal|normal\s+range)",
)
#: Words that cannot be part of a coordinated noun-phrase subject ("heart size and X are normal").
_NOT_SUBJECT_WORDS = frozenset(
    """is are was were be been being appear appears appeared remain remains remained seem seems has have had
    seen noted identified present with without no not there which that who in on at to from by within into
    normal unremarkable clear stable unchanged new increased decreased mild moderate severe small large
    minimal trace marked extensive persistent possible likely probable may might could can cannot""".split()
)
#: Severity and change words: a mention they modify is a finding being reported, not a listed structure.
_ASSERTING_MODIFIER_RE = re.compile(
    r"(?<![a-z])(?:mild|mildly|moderate|moderately|severe|severely|small|large|minimal|trace|marked|extensive|"
    r"new|increased|increasing|worsening|worsened|persistent|residual|diffuse|focal|patchy)\s+(?:[a-z-]+\s+)?$"
)
#: History cues: a past episode of an acute process is not a finding on this image ("history of
#: CHF", "prior granulomatous infection"). Those mentions set no label.
_HISTORY = (
    r"history\s+of",
    r"hx\s+of",
    r"h/o",
    r"prior",
    r"previous",
    r"previously\s+treated",
    r"old",
    r"remote",
    r"sequelae?\s+of",
    r"residua(?:ls?)?\s+of",
)
#: The weak history cues are also comparison words: "the prior effusion has increased", "decrease in
#: the previous pneumothorax", "since prior, edema has worsened" speak of a finding still there.
_WEAK_HISTORY_RE = re.compile(r"(?:prior|previous|old)$")
#: Interval-change and persistence words that make a "prior"/"previous" finding a current one.
_STILL_THERE_RE = re.compile(
    r"(?<![a-z])(?:smaller|larger|bigger|less|more|decreas\w*|increas\w*|improv\w*|worse\w*|reduc\w*|"
    r"enlarg\w*|unchanged|stable|persist\w*|again|still|remains?|re-?demonstrat\w*|"
    r"re-?identified|now|change|changed|slightly|interval)(?![a-z])"
)
#: Categories a history cue cancels (a healed fracture or an old scar is still on the image).
_HISTORY_CATEGORIES = frozenset({"Pneumonia", "Consolidation", "Edema", "Pneumothorax", "Pleural Effusion"})
#: Sites outside the lung: a mass, nodule or carcinoma named with one is not a Lung Lesion
#: ("chest wall mass", "known breast carcinoma", "thyroid nodule").
_EXTRAPULMONARY_SITE_RE = re.compile(
    r"(?<![a-z])(?:breast|chest\s+wall|soft\s+tissue|skin|cutaneous|subcutaneous|thyroid|axillary|osseous|bone|"
    r"bony|rib|liver|hepatic|renal|kidney|adrenal|splenic|abdominal|neck|esophageal|gastric|colon|prostate)"
    r"(?:\s+(?:primary|metastatic|metastasis))?\s+$"
)
#: Categories that name an appearance ("opacity", "nodular density") which a report can attribute to
#: something else; an attribution moves the mention to what it is attributed to.
_APPEARANCE_CATEGORIES = frozenset({"Lung Lesion", "Lung Opacity"})
#: Lung parenchymal categories and concepts: CheXpert keeps "opacity consistent with pneumonia"
#: (or "... suggesting pulmonary fibrosis") as both, so these never take a Lung Opacity away.
_PARENCHYMAL_CATEGORIES = frozenset(
    {"Lung Opacity", "Lung Lesion", "Atelectasis", "Consolidation", "Pneumonia", "Edema"}
)
_PARENCHYMAL_CONCEPTS = frozenset(
    {
        "fibrosis",
        "emphysema",
        "copd",
        "bronchiectasis",
        "bulla",
        "cyst",
        "hyperinflation",
        "hypoinflation",
        "tuberculosis",
        "sarcoidosis",
    }
)
#: Explanations that keep a real lung finding and only say what kind it is (a calcified nodule is a
#: granuloma). Everything else an appearance is attributed to (bone, device, hernia, artifact,
#: overlapping soft tissue, nipple) says there is no lung finding at all.
_CHARACTERISING_CONCEPTS = frozenset({"granuloma", "calcification"})
#: Verbs and phrases that attribute an appearance to a cause or an identity.
_ATTRIBUTION = (
    r"represents?",
    r"representing",
    r"reflects?",
    r"reflecting",
    r"(?:is|are)?\s*(?:most\s+)?(?:likely\s+|probably\s+|presumably\s+)?(?:due|secondary|related|attributable)\s+to",
    r"attributed\s+to",
    r"caused\s+by",
    r"corresponds?\s+(?:to|with)",
    r"corresponding\s+(?:to|with)",
    r"(?:is|are)?\s*(?:consistent|compatible)\s+with",
    r"in\s+keeping\s+with",
    r"(?:is|are)?\s*from",
    r"suggestive\s+of",
    r"suggests?",
    r"suggesting",
    r"indicat(?:es?|ing)",
    # A copula or hedge straight before the explanation ("nodule is calcified", "likely a granuloma").
    r"(?:is|are|was|were)(?:\s+(?:most\s+)?likely|\s+probably|\s+presumably|\s+again)?(?:\s+(?:an?|the))?",
    r"(?:may|might|could)(?:\s+also)?\s+be(?:\s+(?:an?|the))?",
    r"appears?(?:\s+to\s+be)?(?:\s+(?:an?|the))?",
    r"(?:most\s+)?likely(?:\s+(?:an?|the))?",
    r"probably(?:\s+(?:an?|the))?",
)
#: Hedge words in an attribution ("may be artifact", "likely a granuloma", "suggestive of stents").
_HEDGE_RE = re.compile(
    r"(?<![a-z])(?:may|might|could|likely|probably|possibly|presumably|perhaps|suggest|suggests|suggestive|"
    r"suggesting|questionable|favou?red|favou?r|versus|vs)(?![a-z])"
)
#: What an appearance can be attributed to besides knowledge-base concepts: artifacts and normal
#: structures that deny a lung finding, and calcification, which characterises one.
_DENYING_RE = re.compile(
    r"(?<![a-z])(?:artifacts?|artifactual|artefacts?|overlap(?:ping)?|superimpos\w*|summation|"
    r"overlying\s+(?:soft\s+tissues?|structures?)|soft\s+tissues?|breast\s+tissue|breast\s+shadows?|"
    r"nipples?(?:\s+shadows?)?|skin\s+folds?|hair|clothing|external|monitor|ecg|ekg|button|"
    r"vessels?(?:\s+(?:seen\s+)?end[-\s]on)?|vascular\s+(?:shadows?|structures?)|fat\s+pads?|epicardial\s+fat|"
    r"pericardial\s+fat|fat|costochondral|costal\s+cartilages?|cartilage|osteophytes?|bone|bony|rib|ribs|"
    r"gunshot|bullets?|shrapnel|healed|healing)(?![a-z])"
)
_CHARACTERISING_RE = re.compile(r"(?<![a-z])(?:calcified|calcifications?|granulomas?|granulomatous)(?![a-z])")
#: A sentence that opens by pointing back ("This represents ...", "These are likely ...").
_ANAPHOR_RE = re.compile(
    r"\s*(?:(?:this|these|it|they|which|the\s+(?:latter|former))"
    r"(?:\s+(?:finding|findings|nodule|nodules|opacity|opacities|density|densities|lesion|lesions|"
    r"abnormality|abnormalities|area|areas|focus|foci))?)(?:\s+(?:xxxx|most|more|also))*(?![a-z])"
)
#: Words that end a trigger's reach inside a clause (NegEx terminators).
_TERMINATORS = (
    r"there\s+(?:is|are|has|have|was|were|may|might|could|appears?|remains?)",
    r"(?:is|are|was|were)\s+(?:seen|identified|noted|present|visualized|demonstrated|evident|appreciated|detected)",
    r"(?:seen|identified|noted|present|visualized|demonstrated|evident|appreciated|detected)\s*(?:,|and\b)",
    r"with",
    r"consistent\s+with",
    r"secondary\s+to",
    r"due\s+to",
    r"representing",
    r"likely",
    r"probably",
    r"possibly",
    r"and\s+(?:the|a|an|mild|moderate|severe|small|large|stable|new|persistent|increased|decreased)\b",
)
_TOKEN = re.compile(r"[a-z0-9]+(?:[-/'][a-z0-9]+)*|\?")

_LATERALITY_WORDS: dict[str, Laterality] = {
    "left": "left",
    "left-sided": "left",
    "right": "right",
    "right-sided": "right",
    "bilateral": "bilateral",
    "bilaterally": "bilateral",
    "bibasilar": "bilateral",
    "bibasal": "bilateral",
    "biapical": "bilateral",
    "both": "bilateral",
}
_LATERALITY_RE = re.compile(
    r"(?<![a-z])(?:" + "|".join(sorted(map(re.escape, _LATERALITY_WORDS), key=len, reverse=True)) + r")(?![a-z-])"
)


def _alt(patterns: Iterable[str]) -> str:
    return "(?:" + "|".join(patterns) + ")"


def _compile_pre(patterns: Sequence[str]) -> re.Pattern[str]:
    # Anchored at the end of the text before the mention, allowing filler words in between is done
    # by the caller (which finds the last trigger and measures the gap), so here: whole words only.
    return re.compile(r"(?<![a-z0-9])" + _alt(patterns) + r"(?![a-z0-9])")


def _compile_post(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile(r"^[\s,]*(?:[a-z]+\s+){0,2}?" + _alt(patterns) + r"(?![a-z0-9])")


_PRE_NEG_UNCERTAIN_RE = _compile_pre(_PRE_NEG_UNCERTAIN)
_PRE_NEGATION_RE = _compile_pre(_PRE_NEGATION)
_PRE_UNCERTAIN_RE = _compile_pre(_PRE_UNCERTAIN)
_PSEUDO_RE = _compile_pre(_PSEUDO)
_TERMINATOR_RE = _compile_pre(_TERMINATORS)
_POST_NEG_UNCERTAIN_RE = re.compile(r"^[\s,]*" + _alt(_POST_NEG_UNCERTAIN) + r"(?![a-z0-9])")
_POST_NEGATION_RE = _compile_post(_POST_NEGATION)
_POST_UNCERTAIN_RE = re.compile(r"^[\s,]*(?:[a-z]+\s+){0,2}?" + _alt(_POST_UNCERTAIN))
_NORMAL_RE = _compile_pre(_NORMAL_QUALIFIERS)
_PRE_PARTIAL_RESOLUTION_RE = _compile_pre(_PRE_PARTIAL_RESOLUTION)
_POST_PARTIAL_RESOLUTION_RE = _compile_post(_POST_PARTIAL_RESOLUTION)
_POST_NORMAL_RE = re.compile(r"^\s*" + _alt(_POST_NORMAL) + r"(?![a-z0-9])")
_HISTORY_RE = _compile_pre(_HISTORY)
_ATTRIBUTION_RE = _compile_pre(_ATTRIBUTION)
_STABLE_RE = _compile_pre(_STABLE_QUALIFIERS)

#: Reach of triggers, in tokens; negation reaches further than uncertainty because of long lists
#: ("no focal airspace consolidation, pleural effusion, or pneumothorax").
_PRE_NEGATION_REACH = 14
_PRE_UNCERTAIN_REACH = 7
_POST_REACH_CHARS = 40
_QUALIFIER_REACH = 8


@dataclass(frozen=True)
class LabeledReport:
    """CheXpert labels for one report (1.0 / 0.0 / -1.0 / NaN in ``CHEXPERT_CATEGORIES`` order) and its mentions."""

    labels: tuple[float, ...]
    mentions: tuple[Mention, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(CHEXPERT_CATEGORIES, self.labels, strict=True))


@dataclass(frozen=True)
class _Form:
    concept_id: str
    category: str | None
    kind: str  # "finding" | "neutral" | "anatomy" | "modifier" | "unmention"
    group: str
    positive_qualifiers: tuple[str, ...] = ()
    fallback_anatomy: str | None = None


@dataclass(frozen=True)
class _Matcher:
    pattern: re.Pattern[str]
    forms: dict[str, _Form]
    laterality_of: dict[str, Laterality]
    #: Anatomy ids naming lung tissue ("lungs", "right upper lobe"): "clear" there negates Lung Opacity.
    lung_regions: frozenset[str]
    #: The concept a "clear lungs" statement is recorded against.
    opacity_concept: str | None
    #: Per finding surface form, the other-category findings spelled inside it ("nodular opacity"
    #: holds "opacity"): CheXpert matches every observation's phrases independently, so one
    #: phrase can mention two categories.
    inner: dict[str, tuple[_Form, ...]]
    #: Anatomy concept ids: never the thing an appearance is attributed to.
    anatomy_ids: frozenset[str] = frozenset()
    #: Finding and device forms only: a finding phrase that starts inside an anatomy phrase and
    #: runs past it ("left [chest] tube", "right [lung] lesion") must win over the anatomy.
    finding_pattern: re.Pattern[str] | None = None
    #: The vascular catheter a bare "tip in the SVC" implies (the device word is redacted or unusual).
    tip_device: _Form | None = None


_MATCHERS: dict[int, tuple[KnowledgeBase, _Matcher]] = {}


def _matcher(kb: KnowledgeBase) -> _Matcher:
    """Compile once per knowledge-base object (the KB holds dicts, so it is not hashable)."""
    cached = _MATCHERS.get(id(kb))
    if cached is not None and cached[0] is kb:
        return cached[1]
    matcher = _build_matcher(kb)
    _MATCHERS[id(kb)] = (kb, matcher)
    return matcher


def _with_fallback(form: _Form, anatomy_id: str) -> _Form:
    return _Form(form.concept_id, form.category, form.kind, form.group, form.positive_qualifiers, anatomy_id)


def _build_matcher(kb: KnowledgeBase) -> _Matcher:
    priority = {"finding": 0, "device": 0, "unmention": 1, "neutral": 2, "anatomy": 3, "modifier": 4}
    forms: dict[str, _Form] = {}
    anatomy_by_form: dict[str, str] = {}

    def put(surface: str, form: _Form) -> None:
        surface = " ".join(surface.lower().split())
        old = forms.get(surface)
        if old is None or priority[form.kind] < priority[old.kind]:
            forms[surface] = form

    for concept in kb.concepts:
        if concept.group == "anatomy":
            for surface in concept.surface_forms:
                anatomy_by_form.setdefault(surface, concept.id)
    for concept in kb.concepts:
        kind = concept.group if concept.group in ("anatomy", "modifier") else "finding"
        qualifiers = tuple(q.lower() for q in concept.attributes.get("positive_qualifiers", ()))
        # A finding concept with positive qualifiers ("heart size") is neutral as a whole; extra
        # neutral spellings ("heart") may be listed under "qualified_forms" / "neutral_forms".
        neutral = {s.lower() for key in ("qualified_forms", "neutral_forms") for s in concept.attributes.get(key, ())}
        if qualifiers and kind == "finding":
            neutral |= set(concept.surface_forms)
        for surface in concept.surface_forms:
            if surface not in neutral:
                put(surface, _Form(concept.id, concept.chexpert_category, kind, concept.group))
        for surface in concept.unmention:
            put(surface, _Form(concept.id, concept.chexpert_category, "unmention", concept.group))
        for surface in sorted(neutral):
            form = _Form(concept.id, concept.chexpert_category, "neutral", concept.group, qualifiers)
            put(surface, form if surface not in anatomy_by_form else _with_fallback(form, anatomy_by_form[surface]))
    alternatives = sorted(forms, key=lambda s: (-len(s), s))
    body = "|".join(r"\s+".join(re.escape(part) for part in s.split(" ")) for s in alternatives)
    pattern = re.compile(r"(?<![a-z0-9])(?:" + body + r")(?![a-z0-9])")
    laterality_of: dict[str, Laterality] = {}
    for concept in kb.concepts:
        if concept.group != "anatomy":
            continue
        sides = concept.attributes.get("laterality", ())
        first = concept.name.lower().split()[0]
        if len(sides) == 1 and sides[0] in ("left", "right", "bilateral"):
            laterality_of[concept.id] = sides[0]  # type: ignore[assignment]
        elif first in ("left", "right"):
            laterality_of[concept.id] = first  # type: ignore[assignment]
    lung_regions = frozenset(
        c.id
        for c in kb.concepts
        if c.group == "anatomy" and any(re.search(r"\b(?:lungs?|lobes?|lingula)\b", f) for f in c.surface_forms)
    )
    opacity = kb.for_category("Lung Opacity")
    unmentions = {c.id: tuple(f" {u.lower()} " for u in c.unmention) for c in kb.concepts}
    findings = {f: form for f, form in forms.items() if form.kind == "finding" and form.category is not None}
    inner: dict[str, tuple[_Form, ...]] = {}
    for outer, outer_form in forms.items():
        if outer_form.kind != "finding":
            continue
        padded = f" {outer} "
        found = {
            (form.concept_id, form.category): form
            for text, form in findings.items()
            if form.category != outer_form.category
            and len(text) < len(outer)
            and f" {text} " in padded
            and not any(u in padded for u in unmentions[form.concept_id])
        }
        if found:
            inner[outer] = tuple(found.values())
    anatomy_ids = frozenset(c.id for c in kb.concepts if c.group == "anatomy")
    finding_forms = sorted(
        (s for s, f in forms.items() if f.kind in ("finding", "unmention")), key=lambda s: (-len(s), s)
    )
    finding_body = "|".join(r"\s+".join(re.escape(part) for part in s.split(" ")) for s in finding_forms)
    finding_pattern = re.compile(r"(?<![a-z0-9])(?:" + finding_body + r")(?![a-z0-9])")
    return _Matcher(
        pattern,
        forms,
        laterality_of,
        lung_regions,
        opacity[0].id if opacity else None,
        inner,
        anatomy_ids,
        finding_pattern,
        _catheter_form(kb),
    )


def _catheter_form(kb: KnowledgeBase) -> _Form | None:
    """The KB's central venous catheter concept, as a finding form (None if the KB has none)."""
    for concept in kb.for_category("Support Devices"):
        if any("central venous catheter" in f.lower() for f in concept.surface_forms):
            return _Form(concept.id, concept.chexpert_category, "finding", concept.group)
    return None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def extract_mentions(text: str, kb: KnowledgeBase | None = None) -> list[Mention]:
    """Every finding, device and anatomy mention in ``text`` with certainty, laterality and location.

    Spans index ``text`` itself. Sections that only give context (indication, history, comparison,
    technique) are skipped, as the CheXpert labeler does by labelling findings/impression only.
    """
    kb = kb or load_knowledge_base()
    matcher = _matcher(kb)
    low = _lower_same_length(text)
    mentions: list[Mention] = []
    previous: list[Mention] = []
    for sentence in split_report(text):
        if sentence.section in NON_FINDING_SECTIONS:
            previous = []
            continue
        clauses = split_clauses(text, sentence.start, sentence.end)
        current: list[Mention] = []
        for clause_start, clause_end in clauses:
            current.extend(_clause_mentions(text, low, matcher, clause_start, clause_end, sentence))
        current = _attribute_within(low, current, clauses, matcher.anatomy_ids)
        if previous:
            # The previous sentence's mentions are the tail of ``mentions``.
            mentions[len(mentions) - len(previous) :] = _attribute_anaphora(
                low, sentence, previous, current, clauses, matcher.anatomy_ids
            )
        mentions.extend(current)
        previous = current
    return mentions


def label_report(text: str, kb: KnowledgeBase | None = None) -> LabeledReport:
    """Label one report the CheXpert way: per-category aggregation plus the No Finding rule."""
    kb = kb or load_knowledge_base()
    mentions = extract_mentions(text, kb)
    return LabeledReport(labels=aggregate(mentions, kb), mentions=tuple(mentions))


def label_reports(texts: Iterable[str], kb: KnowledgeBase | None = None) -> list[LabeledReport]:
    """Label many reports with one compiled matcher."""
    kb = kb or load_knowledge_base()
    return [label_report(text, kb) for text in texts]


def aggregate(mentions: Iterable[Mention], kb: KnowledgeBase | None = None) -> tuple[float, ...]:
    """CheXpert aggregation: positive beats uncertain beats negative; chf adds uncertain cardiomegaly.

    No Finding is 1 when no category other than Support Devices is positive or uncertain and no
    "other finding" (a finding concept without a CheXpert category, e.g. emphysema) is positive;
    otherwise blank, as in CheXpert.
    """
    kb = kb or load_knowledge_base()
    other_findings = {c.id for c in kb.concepts if c.group == "finding" and c.chexpert_category is None}
    seen: dict[str, set[str]] = {c: set() for c in CHEXPERT_CATEGORIES}
    other_positive = False
    for mention in mentions:
        if mention.category is not None:
            seen[mention.category].add(mention.certainty)
        elif mention.certainty == "positive" and mention.concept_id in other_findings:
            other_positive = True
        if mention.concept_id in CHF_CONCEPTS and mention.certainty in ("positive", "uncertain"):
            seen["Cardiomegaly"].add("uncertain")
    labels = {c: _combine(seen[c]) for c in CHEXPERT_CATEGORIES}
    abnormal = any(labels[c] in (POSITIVE, UNCERTAIN) for c in CHEXPERT_CATEGORIES if c not in _NO_FINDING_EXEMPT)
    labels["No Finding"] = BLANK if abnormal or other_positive else POSITIVE
    return tuple(labels[c] for c in CHEXPERT_CATEGORIES)


# ----------------------------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------------------------


def _combine(certainties: set[str]) -> float:
    if "positive" in certainties:
        return POSITIVE
    if "uncertain" in certainties:
        return UNCERTAIN
    if "negative" in certainties:
        return NEGATIVE
    return BLANK


def _lower_same_length(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


@dataclass
class _Hit:
    start: int
    end: int
    form: _Form


def _clause_mentions(
    text: str, low: str, matcher: _Matcher, c_start: int, c_end: int, sentence: Sentence
) -> list[Mention]:
    """Mentions in one clause: match surface forms, resolve neutral forms, classify, locate."""
    hits = [
        _Hit(m.start(), m.end(), matcher.forms[" ".join(m.group(0).split())])
        for m in matcher.pattern.finditer(low, c_start, c_end)
    ]
    hits = _prefer_findings_over_anatomy(low, matcher, hits, c_end)
    hits = _implied_catheter(low, matcher, hits, c_start, c_end)
    findings = [(h.start, h.end) for h in hits if h.form.kind == "finding"]
    resolved: list[tuple[_Hit, Certainty]] = []
    for hit in hits:
        form = hit.form
        if form.kind in ("unmention", "modifier"):
            continue
        if form.kind == "neutral":
            certainty = _qualify(low, hit, c_start, c_end, findings)
            if certainty is None:
                if form.fallback_anatomy is None:
                    continue
                hit = _Hit(hit.start, hit.end, _Form(form.fallback_anatomy, None, "anatomy", "anatomy"))
                certainty = "positive"
        elif form.kind == "anatomy":
            certainty = "positive"
            if (
                form.concept_id in matcher.lung_regions
                and matcher.opacity_concept
                and _is_clear(low, hit, c_end, sentence.end)
            ):
                # "The lungs are clear" is how radiologists deny opacity; record it as a negated opacity.
                opacity = _Form(matcher.opacity_concept, "Lung Opacity", "finding", "finding")
                resolved.append((_Hit(hit.start, hit.end, opacity), "negative"))
        else:
            if form.category == "Lung Lesion" and _EXTRAPULMONARY_SITE_RE.search(
                low, max(c_start, hit.start - 30), hit.start
            ):
                continue  # "chest wall mass", "breast carcinoma": not in the lung
            certainty = _classify(low, hit.start, hit.end, c_start, c_end)
            if (
                certainty != "negative"
                and form.category in _HISTORY_CATEGORIES
                and _is_history(low, c_start, hit.start, hit.end, c_end)
            ):
                continue  # "history of CHF", "prior granulomatous infection": not on this image
            for extra in matcher.inner.get(" ".join(low[hit.start : hit.end].split()), ()):
                resolved.append((_Hit(hit.start, hit.end, extra), certainty))
        resolved.append((hit, certainty))
    anatomy = [h for h, _ in resolved if h.form.kind == "anatomy"]
    out: list[Mention] = []
    for hit, certainty in resolved:
        is_anatomy = hit.form.kind == "anatomy"
        location = None if is_anatomy else _location(hit, anatomy)
        out.append(
            Mention(
                concept_id=hit.form.concept_id,
                category=hit.form.category,
                start=hit.start,
                end=hit.end,
                text=text[hit.start : hit.end],
                certainty=certainty,
                laterality=_laterality(low, hit, c_start, c_end, location, matcher),
                location=location,
                section=sentence.section,
                sentence_start=sentence.start,
                sentence_end=sentence.end,
            )
        )
    return out


def _prefer_findings_over_anatomy(low: str, matcher: _Matcher, hits: list[_Hit], c_end: int) -> list[_Hit]:
    """Let a finding phrase that begins inside an anatomy phrase and runs past it replace it.

    The matcher takes the leftmost match, so "left chest tube" is read as the anatomy "left chest"
    and a bare "tube" (not a device), and "right lung lesion" as "right lung" and a bare "lesion".
    The anatomy word is shared; the finding is what the sentence reports. Laterality is still read
    from the words around the finding.
    """
    if matcher.finding_pattern is None or not any(h.form.kind == "anatomy" for h in hits):
        return hits
    out = list(hits)
    for a in [h for h in hits if h.form.kind == "anatomy"]:
        for m in matcher.finding_pattern.finditer(low, a.start + 1, c_end):
            if m.start() >= a.end:
                break
            if m.end() <= a.end:
                continue
            form = matcher.forms.get(" ".join(m.group(0).split()))
            if form is None or form.kind not in ("finding", "unmention"):
                break
            out = [h for h in out if h.end <= m.start() or h.start >= m.end()]
            out.append(_Hit(m.start(), m.end(), form))
            break
    return sorted(out, key=lambda h: h.start)


#: A tip placed in a central vein or the right atrium belongs to a vascular catheter, whatever the
#: report calls it ("right chest XXXX tip is in the mid SVC", "its tip projects at the cavoatrial junction").
_CENTRAL_TIP_RE = re.compile(
    r"(?<![a-z])tips?(?![a-z])[^.;]{0,50}?(?<![a-z])(?:svc|superior\s+vena\s+cava|cavo-?atrial|caval-?atrial|"
    r"(?:right\s+)?atri(?:um|al\s+junction)|brachiocephalic\s+vein|innominate\s+vein|subclavian\s+vein)(?![a-z])"
)


def _implied_catheter(low: str, matcher: _Matcher, hits: list[_Hit], c_start: int, c_end: int) -> list[_Hit]:
    """Add a catheter mention for a central-venous tip position when the clause names no device."""
    if matcher.tip_device is None or any(h.form.group == "device" for h in hits):
        return hits
    match = _CENTRAL_TIP_RE.search(low, c_start, c_end)
    if match is None:
        return hits
    tip_end = match.start() + len(re.match(r"tips?", match.group(0)).group(0))  # type: ignore[union-attr]
    return sorted([*hits, _Hit(match.start(), tip_end, matcher.tip_device)], key=lambda h: h.start)


_CLEAR_RE = re.compile(
    r"^\s*(?:(?:is|are|appear|appears|remain|remains)\s+)?(?:(?:now|otherwise|grossly)\s+)?clear(?![a-z])"
)
_CLEAR_BEFORE_RE = re.compile(r"(?<![a-z])clear\s*$")
#: "The lungs are hyperinflated but clear", "lungs are low in volume and clear": a second predicate.
_CLEAR_SECOND_RE = re.compile(
    r"^\s*(?:is|are|appear|appears|remain|remains)\s+(?:[a-z-]+\s+){1,3}(?:but|and|yet)\s+"
    r"(?:(?:now|otherwise|grossly|are|appear|remain)\s+)?clear(?![a-z])"
)


def _is_clear(low: str, hit: _Hit, c_end: int, s_end: int | None = None) -> bool:
    after = low[hit.end : c_end]
    before = low[max(0, hit.start - 12) : hit.start]
    if _CLEAR_RE.match(after) or _CLEAR_BEFORE_RE.search(before):
        return True
    # The clause splitter cuts at "but", so the second predicate is read up to the sentence's end.
    return bool(_CLEAR_SECOND_RE.match(low[hit.end : s_end if s_end is not None else c_end]))


def _is_history(low: str, c_start: int, m_start: int, m_end: int, c_end: int) -> bool:
    """A history cue straight before the mention ("history of CHF", "prior pneumonia").

    "Prior", "previous" and "old" are also how a report compares: a comma between cue and mention
    ("since prior, edema has worsened") or an interval-change or persistence word in the clause
    ("the prior effusion has increased", "decrease in the previous pneumothorax") makes the
    finding a current one.
    """
    cue = _last_trigger(_HISTORY_RE, low, c_start, m_start)
    if cue is None or _tokens_between(low, cue.end(), m_start) > 2:
        return False
    if _TERMINATOR_RE.search(low, cue.end(), m_start) is not None or re.search(r"[,;:]", low[cue.end() : m_start]):
        return False
    if _WEAK_HISTORY_RE.search(cue.group(0)) and _STILL_THERE_RE.search(low, c_start, c_end):
        return False
    return True


def _tokens_between(low: str, start: int, end: int) -> int:
    return len(_TOKEN.findall(low, start, end))


def _last_trigger(regex: re.Pattern[str], low: str, lo: int, hi: int) -> re.Match[str] | None:
    """The trigger closest before ``hi`` that is not a pseudo-trigger."""
    pseudo = [(m.start(), m.end()) for m in _PSEUDO_RE.finditer(low, lo, hi)]
    best = None
    for match in regex.finditer(low, lo, hi):
        if any(ps <= match.start() < pe for ps, pe in pseudo):
            continue
        best = match
    return best


def _pre_trigger(
    regex: re.Pattern[str], low: str, c_start: int, m_start: int, reach: int, m_end: int = -1, c_end: int = -1
) -> bool:
    """Whether a trigger before the mention reaches it; given the mention's end, a closed list stops it."""
    match = _last_trigger(regex, low, c_start, m_start)
    if match is None:
        return False
    if _tokens_between(low, match.end(), m_start) > reach:
        return False
    if m_end >= 0 and _list_closed(low, match.end(), m_start, m_end, c_end):
        return False
    return _TERMINATOR_RE.search(low, match.end(), m_start) is None


#: A list under a trigger that has had its last item ("no effusion or pneumothorax, ..."), or a
#: comma followed by a word that asserts ("..., only mild atelectasis").
_CONJUNCTION_RE = re.compile(r"(?<![a-z])(?:or|nor|and)(?![a-z])")
_ASSERTS_AFTER_COMMA_RE = re.compile(r"\s*(?:only|mild|mildly|minimal|minimally|slight|trace|tiny)(?![a-z])")
_LIST_GOES_ON_RE = re.compile(r"[^,;]*?(?:,\s*)?(?<![a-z])(?:or|nor)(?![a-z])")


def _list_closed(low: str, t_end: int, m_start: int, m_end: int, c_end: int) -> bool:
    """ "No effusion or consolidation, bibasilar atelectasis": the negated list ended before the mention.

    The list has ended when an and/or/nor came before the last comma and none after it, or when the
    words after the last comma assert ("only", "mild"). Not when the list goes on after the mention
    ("no acute bony or soft tissue abnormality, fracture, or pneumothorax": that "or" was inside
    one item).
    """
    comma = low.rfind(",", t_end, m_start)
    if comma < 0:
        return False
    last_item = low[comma + 1 : m_start]
    if _CONJUNCTION_RE.search(last_item):
        return False
    closed = _CONJUNCTION_RE.search(low, t_end, comma) is not None or _ASSERTS_AFTER_COMMA_RE.match(last_item)
    if not closed:
        return False
    return _LIST_GOES_ON_RE.match(low, m_end, c_end if c_end >= 0 else len(low)) is None


def _classify(low: str, m_start: int, m_end: int, c_start: int, c_end: int) -> Certainty:
    """NegBio order: pre-negation uncertainty, negation, post-negation uncertainty; else positive.

    Two additions sit in that order: partial resolution ("resolving", "nearly resolved") is an
    uncertainty checked before negation, because negation owns the complete forms ("resolved");
    and the post-mention rules also look past a coordinated subject ("heart size and pulmonary
    vascular engorgement appear within limits of normal", "A and B have resolved").
    """
    after = low[m_end : min(c_end, m_end + _POST_REACH_CHARS)]
    predicate = _after_coordinated_subject(low, m_start, m_end, c_start, c_end)
    later = low[predicate : min(c_end, predicate + _POST_REACH_CHARS)] if predicate is not None else None
    if _pre_trigger(_PRE_NEG_UNCERTAIN_RE, low, c_start, m_start, _PRE_NEGATION_REACH):
        return "uncertain"
    if _POST_NEG_UNCERTAIN_RE.match(after):
        return "uncertain"
    if _pre_trigger(_PRE_PARTIAL_RESOLUTION_RE, low, c_start, m_start, _PRE_UNCERTAIN_REACH):
        return "uncertain"
    if _POST_PARTIAL_RESOLUTION_RE.match(after) or (later is not None and _POST_PARTIAL_RESOLUTION_RE.match(later)):
        return "uncertain"
    if _pre_trigger(_PRE_NEGATION_RE, low, c_start, m_start, _PRE_NEGATION_REACH, m_end, c_end):
        return "negative"
    # "congestion, pleural effusions are not seen": after a bare comma the predicate belongs to the
    # next statement; a real list ("A, B, and C are not seen") is read through ``later``.
    direct = None if _COMMA_SPLICE_RE.match(after) else after
    for text in (direct, later):
        if text is None:
            continue
        if _POST_NEGATION_RE.match(text) and not _PSEUDO_RE.match(text.lstrip(" ,")):
            return "negative"
        if _POST_NORMAL_RE.match(text):
            return "negative"
    if _pre_trigger(_PRE_UNCERTAIN_RE, low, c_start, m_start, _PRE_UNCERTAIN_REACH):
        return "uncertain"
    if _POST_UNCERTAIN_RE.match(after) or (later is not None and _POST_UNCERTAIN_RE.match(later)):
        return "uncertain"
    return "positive"


_COMMA_SPLICE_RE = re.compile(r"\s*,\s*(?!(?:and|or|nor|not|no)(?![a-z]))[a-z]")
_WORD_OR_COMMA = re.compile(r"\s*(,|&|[a-z0-9]+(?:[-/'][a-z0-9]+)*)")


def _after_coordinated_subject(low: str, m_start: int, m_end: int, c_start: int, c_end: int) -> int | None:
    """Where the predicate starts when the mention heads a list of subjects, else None.

    "X and Y are normal", "X, Y, and the Z have resolved": the words after the mention must be
    conjunctions, commas and short noun phrases (no verb, preposition or finding modifier), and the
    list ends where the predicate begins. A mention modified by a severity or change word ("mild
    edema and ...") reports a finding, so it never heads such a list.
    """
    if _ASSERTING_MODIFIER_RE.search(low, max(c_start, m_start - 30), m_start):
        return None
    pos, items, words_in_item, joined, saw_conjunction = m_end, 0, 0, False, False
    last_item_end = None
    while pos < c_end:
        match = _WORD_OR_COMMA.match(low, pos, c_end)
        if match is None:
            break
        word = match.group(1)
        if word in (",", "&", "and", "or"):
            if words_in_item == 0 and joined and word not in ("and", "or"):
                return None
            saw_conjunction = saw_conjunction or word != ","
            joined, words_in_item = True, 0
        elif word in ("the", "a", "an") and words_in_item == 0 and joined:
            pass
        elif word in _NOT_SUBJECT_WORDS:
            break
        elif joined:
            words_in_item += 1
            if words_in_item > 4:
                return None
            if words_in_item == 1:
                items += 1
            last_item_end = match.end()
        else:
            return None  # a word straight after the mention that is not a conjunction
        pos = match.end()
    if items == 0 or last_item_end is None or words_in_item == 0 or not saw_conjunction:
        return None  # "A, B are normal" without and/or is two statements, not one list
    return last_item_end


@dataclass(frozen=True)
class _Target:
    """What an appearance is attributed to: a mention's category and concept, or a bare word."""

    category: str | None
    concept_id: str | None
    denies: bool


def _attribution_targets(
    low: str,
    t_end: int,
    current: Sequence[Mention],
    clauses: Sequence[tuple[int, int]],
    anatomy: frozenset[str],
) -> tuple[int, list[_Target]] | None:
    """What an attribution trigger ending at ``t_end`` attributes to: (start, targets), or None.

    The explanation must start within three words of the trigger; it extends over the mentions
    that follow it in the same clause, within eight words ("atelectasis or scarring").
    """
    clause_end = next((b for a, b in clauses if a <= t_end < b), None)
    if clause_end is None:
        return None
    found: list[tuple[int, _Target]] = []
    for regex, denies in ((_DENYING_RE, True), (_CHARACTERISING_RE, False)):
        word = regex.search(low, t_end, clause_end)
        if word is not None and _tokens_between(low, t_end, word.start()) <= 3:
            found.append((word.start(), _Target(None, None, denies)))
    for m in current:
        if m.concept_id in anatomy or not t_end <= m.start < clause_end:
            continue
        if _tokens_between(low, t_end, m.start) <= 8:
            characterises = (
                m.concept_id in _CHARACTERISING_CONCEPTS
                or m.concept_id in _PARENCHYMAL_CONCEPTS
                or m.category in _PARENCHYMAL_CATEGORIES
            )
            found.append((m.start, _Target(m.category, m.concept_id, not characterises)))
    if not found:
        return None
    first = min(start for start, _ in found)
    if _tokens_between(low, t_end, first) > 3:
        return None
    return first, [target for _, target in found]


def _attribution_verdict(category: str | None, targets: list[_Target], hedged: bool) -> str | None:
    """ "moved" (drop the appearance), "uncertain", or None (leave it) for an attributed appearance.

    Left alone when a target is the same category ("nodule consistent with neoplasm") or, for Lung
    Opacity, a parenchymal finding ("opacity consistent with pneumonia": CheXpert labels both). A
    firm attribution moves the appearance. A hedged one makes it uncertain when the explanation
    denies a lung finding ("may be artifact", "suggestive of stents"), and leaves it when it only
    characterises one ("nodule, likely a granuloma": a nodule all the same).
    """
    if any(t.category == category for t in targets):
        return None
    if category == "Lung Opacity" and any(
        t.category in _PARENCHYMAL_CATEGORIES or t.concept_id in _PARENCHYMAL_CONCEPTS for t in targets
    ):
        return None
    if not hedged:
        return "moved"
    return "uncertain" if any(t.denies for t in targets) else None


def _attribute_within(
    low: str, current: list[Mention], clauses: Sequence[tuple[int, int]], anatomy: frozenset[str]
) -> list[Mention]:
    """Appearances attributed to something else in their own sentence move there (or turn uncertain).

    "Nodular density overlying the left 4th rib represents a healing rib fracture": the density is
    the fracture, so the Lung Lesion mention is dropped (the fracture keeps its own mention).
    """
    out: list[Mention] = []
    for m in current:
        if m.category not in _APPEARANCE_CATEGORIES or m.certainty == "negative":
            out.append(m)
            continue
        verdict = None
        for trigger in _ATTRIBUTION_RE.finditer(low, m.end, m.sentence_end):
            if _tokens_between(low, m.end, trigger.start()) > 12:
                break
            if any(
                o.concept_id not in anatomy
                and m.end <= o.start < trigger.start()
                and not (o.category in _APPEARANCE_CATEGORIES and _tokens_between(low, m.end, o.start) <= 1)
                for o in current
            ):
                break  # another finding stands between ("nodular-like opacity" is one phrase)
            hit = _attribution_targets(low, trigger.end(), current, clauses, anatomy)
            if hit is None:
                continue
            first, targets = hit
            verdict = _attribution_verdict(m.category, targets, _HEDGE_RE.search(low, m.end, first) is not None)
            break
        if verdict is None:
            out.append(m)
        elif verdict == "uncertain":
            out.append(_with_certainty(m, "uncertain"))
    return out


def _attribute_anaphora(
    low: str,
    sentence: Sentence,
    previous: list[Mention],
    current: list[Mention],
    clauses: Sequence[tuple[int, int]],
    anatomy: frozenset[str],
) -> list[Mention]:
    """ "Small nodule near the left heart border. This represents a calcified granuloma.": a sentence
    that opens by pointing back and attributes moves the previous sentence's appearances."""
    opener = _ANAPHOR_RE.match(low, sentence.start, sentence.end)
    if opener is None:
        return previous
    trigger = _ATTRIBUTION_RE.search(low, opener.end(), sentence.end)
    if trigger is None or _tokens_between(low, opener.end(), trigger.start()) > 2:
        return previous
    hit = _attribution_targets(low, trigger.end(), current, clauses, anatomy)
    if hit is None:
        return previous
    first, targets = hit
    hedged = _HEDGE_RE.search(low, opener.start(), first) is not None
    out: list[Mention] = []
    for m in previous:
        verdict = None
        if m.category in _APPEARANCE_CATEGORIES and m.certainty != "negative":
            verdict = _attribution_verdict(m.category, targets, hedged)
        if verdict is None:
            out.append(m)
        elif verdict == "uncertain":
            out.append(_with_certainty(m, "uncertain"))
    return out


def _with_certainty(m: Mention, certainty: Certainty) -> Mention:
    return replace(m, certainty=certainty)


_QUALIFIER_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=64)
def _qualifier_re(qualifiers: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = sorted((r"\s+".join(map(re.escape, q.split())) for q in qualifiers), key=len, reverse=True)
    return re.compile(r"(?<![a-z])(?:" + "|".join(alternatives) + r")(?![a-z])")


def _qualify(
    low: str, hit: _Hit, c_start: int, c_end: int, findings: Sequence[tuple[int, int]] = ()
) -> Certainty | None:
    """Certainty of a neutral form from the nearest qualifier, or None when nothing qualifies it.

    A qualifier inside another finding's phrase belongs to that finding: "increased density behind
    the heart" says nothing about the heart's size.
    """
    candidates: list[tuple[int, int, int, str]] = []  # (distance, start, end, kind)
    normal = [(m.start(), m.end()) for m in _NORMAL_RE.finditer(low, c_start, c_end)]
    if hit.form.positive_qualifiers:
        for m in _qualifier_re(hit.form.positive_qualifiers).finditer(low, c_start, c_end):
            # "upper limits of normal" is a normal size, whatever a KB lists as a positive qualifier.
            if not any(ns < m.end() and m.start() < ne for ns, ne in normal):
                candidates.append((0, m.start(), m.end(), "positive"))
    candidates.extend((0, ns, ne, "negative") for ns, ne in normal)
    for m in _STABLE_RE.finditer(low, c_start, c_end):
        candidates.append((0, m.start(), m.end(), "uncertain"))
    candidates = [c for c in candidates if not any(fs < c[2] and c[1] < fe for fs, fe in findings)]
    best: tuple[int, int, int, str] | None = None
    for _, q_start, q_end, kind in candidates:
        if q_end <= hit.start:
            gap = _tokens_between(low, q_end, hit.start)
            if gap > 3:
                continue
        elif q_start >= hit.end:
            gap = _tokens_between(low, hit.end, q_start)
            if gap > _QUALIFIER_REACH:
                continue
        else:
            continue
        if best is None or gap < best[0]:
            best = (gap, q_start, q_end, kind)
    if best is None:
        return None
    _, q_start, q_end, kind = best
    if kind != "positive":
        return kind  # type: ignore[return-value]
    span_start, span_end = min(hit.start, q_start), max(hit.end, q_end)
    between = low[min(hit.end, q_end) : max(hit.start, q_start)]
    if re.search(r"(?<![a-z])(?:not|no|without)(?![a-z])", between):
        return "negative"
    return _classify(low, span_start, span_end, c_start, c_end)


def _location(hit: _Hit, anatomy: list[_Hit]) -> str | None:
    """The nearest anatomy mention in the clause: after ("in the right lower lobe") or before it."""
    best: tuple[int, str] | None = None
    for a in anatomy:
        if a.form.concept_id in ("heart", "mediastinum", "lung") and hit.form.category not in (None,):
            # Generic organ words rarely locate a finding more precisely than the finding itself.
            if a.form.concept_id != "lung":
                continue
        distance = a.start - hit.end if a.start >= hit.end else hit.start - a.end
        if distance < 0 or distance > 40:
            continue
        if best is None or distance < best[0]:
            best = (distance, a.form.concept_id)
    return best[1] if best else None


def _laterality(
    low: str,
    hit: _Hit,
    c_start: int,
    c_end: int,
    location: str | None,
    matcher: _Matcher,
) -> Laterality | None:
    """Left/right/bilateral from words near the mention, else from the location's own side."""
    found: set[Laterality] = set()
    for m in _LATERALITY_RE.finditer(low, c_start, c_end):
        side = _LATERALITY_WORDS[m.group(0)]
        near_before = m.end() <= hit.start and _tokens_between(low, m.end(), hit.start) <= 4
        near_after = m.start() >= hit.end and _tokens_between(low, hit.end, m.start()) <= 6
        if near_before or near_after:
            found.add(side)
    for m in _LATERALITY_RE.finditer(low, hit.start, hit.end):
        found.add(_LATERALITY_WORDS[m.group(0)])
    if location and location in matcher.laterality_of:
        found.add(matcher.laterality_of[location])
    if not found:
        return None
    if "bilateral" in found or {"left", "right"} <= found:
        return "bilateral"
    return next(iter(found))
