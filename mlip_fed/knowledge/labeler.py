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
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
    r"removal\s+of",
    r"rather\s+than",
    r"nor",
    r"never",
    r"deny|denies",
    r"ruled\s+out",
    r"excluded",
    r"no\s+(?:evidence|sign|signs|findings?|suggestion|radiographic\s+evidence)\s+(?:of|for|to\s+suggest)",
)
_POST_NEGATION = (
    r"(?:is|are|was|were|has\s+been|have\s+been)?\s*(?:not|no\s+longer)\b",
    r"(?:is|are|was|were|has|have)?\s*(?:been\s+)?(?:resolved|removed|absent|cleared|withdrawn)",
    r"(?:is|are)?\s*negative",
    r"(?:has|have)\s+(?:since\s+)?(?:resolved|cleared)",
)
#: Words that make a mention uncertain when they precede it in the clause.
_PRE_UNCERTAIN = (
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
    r"represent",
    r"representing",
)
_POST_UNCERTAIN = (
    r"(?:is|are)\s+(?:possible|suspected|questioned|likely|probable|not\s+certain|uncertain|considered)",
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
    return _Matcher(pattern, forms, laterality_of, lung_regions, opacity[0].id if opacity else None, inner)


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
    for sentence in split_report(text):
        if sentence.section in NON_FINDING_SECTIONS:
            continue
        for clause_start, clause_end in split_clauses(text, sentence.start, sentence.end):
            mentions.extend(_clause_mentions(text, low, matcher, clause_start, clause_end, sentence))
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
    resolved: list[tuple[_Hit, Certainty]] = []
    for hit in hits:
        form = hit.form
        if form.kind in ("unmention", "modifier"):
            continue
        if form.kind == "neutral":
            certainty = _qualify(low, hit, c_start, c_end)
            if certainty is None:
                if form.fallback_anatomy is None:
                    continue
                hit = _Hit(hit.start, hit.end, _Form(form.fallback_anatomy, None, "anatomy", "anatomy"))
                certainty = "positive"
        elif form.kind == "anatomy":
            certainty = "positive"
            if form.concept_id in matcher.lung_regions and matcher.opacity_concept and _is_clear(low, hit, c_end):
                # "The lungs are clear" is how radiologists deny opacity; record it as a negated opacity.
                opacity = _Form(matcher.opacity_concept, "Lung Opacity", "finding", "finding")
                resolved.append((_Hit(hit.start, hit.end, opacity), "negative"))
        else:
            certainty = _classify(low, hit.start, hit.end, c_start, c_end)
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


_CLEAR_RE = re.compile(
    r"^\s*(?:(?:is|are|appear|appears|remain|remains)\s+)?(?:(?:now|otherwise|grossly)\s+)?clear(?![a-z])"
)
_CLEAR_BEFORE_RE = re.compile(r"(?<![a-z])clear\s*$")


def _is_clear(low: str, hit: _Hit, c_end: int) -> bool:
    after = low[hit.end : c_end]
    before = low[max(0, hit.start - 12) : hit.start]
    return bool(_CLEAR_RE.match(after) or _CLEAR_BEFORE_RE.search(before))


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


def _pre_trigger(regex: re.Pattern[str], low: str, c_start: int, m_start: int, reach: int) -> bool:
    match = _last_trigger(regex, low, c_start, m_start)
    if match is None:
        return False
    if _tokens_between(low, match.end(), m_start) > reach:
        return False
    return _TERMINATOR_RE.search(low, match.end(), m_start) is None


def _classify(low: str, m_start: int, m_end: int, c_start: int, c_end: int) -> Certainty:
    """NegBio order: pre-negation uncertainty, negation, post-negation uncertainty; else positive."""
    after = low[m_end : min(c_end, m_end + _POST_REACH_CHARS)]
    if _pre_trigger(_PRE_NEG_UNCERTAIN_RE, low, c_start, m_start, _PRE_NEGATION_REACH):
        return "uncertain"
    if _POST_NEG_UNCERTAIN_RE.match(after):
        return "uncertain"
    if _pre_trigger(_PRE_NEGATION_RE, low, c_start, m_start, _PRE_NEGATION_REACH):
        return "negative"
    if _POST_NEGATION_RE.match(after) and not _PSEUDO_RE.match(after.lstrip(" ,")):
        return "negative"
    if _pre_trigger(_PRE_UNCERTAIN_RE, low, c_start, m_start, _PRE_UNCERTAIN_REACH):
        return "uncertain"
    if _POST_UNCERTAIN_RE.match(after):
        return "uncertain"
    return "positive"


_QUALIFIER_WORD = re.compile(r"[a-z]+")


@lru_cache(maxsize=64)
def _qualifier_re(qualifiers: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = sorted((r"\s+".join(map(re.escape, q.split())) for q in qualifiers), key=len, reverse=True)
    return re.compile(r"(?<![a-z])(?:" + "|".join(alternatives) + r")(?![a-z])")


def _qualify(low: str, hit: _Hit, c_start: int, c_end: int) -> Certainty | None:
    """Certainty of a neutral form from the nearest qualifier, or None when nothing qualifies it."""
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
