"""Counterfactual reports for text swapping (docs/method.md, "swap" rows): one clinical claim changed.

``make_counterfactual`` edits a report at the labeler's mention spans: a finding is swapped for a
finding of another category, a laterality is flipped, or a negation is flipped. The result is
the same report with one clinical claim changed, which the fusion head must learn to reject
(label 0) against the study's own image (``mlip_fed.model.objectives.text_swap``). Pure Python over the
knowledge base's public vocabulary, seeded by the caller's ``random.Random``; the collator builds the
counterfactuals, so it lives with the knowledge code rather than with the model.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.mentions import Mention

Edit = tuple[int, int, str]  # replace text[start:end] with the string

_NEGATION = re.compile(r"\b(no evidence of|negative for|free of|absence of|without|no)\s+", flags=re.IGNORECASE)
_LATERALITY = re.compile(r"\b(left|right|bilateral)\b", flags=re.IGNORECASE)
_FLIP = {"left": "right", "right": "left"}
_PHRASE_BOUNDARY = re.compile(
    r"(\b(is|are|was|were|with|of|shows?|demonstrates?|reveals?|suggests?|represents?|there|and|or)\b|[,;:])\s*",
    flags=re.IGNORECASE,
)


def default_findings() -> list[tuple[str, str]]:
    """(category, phrase) replacement pool: the CheXpert finding names (public, identical at every site).

    Category names rather than every KB concept: concepts such as "heart size" name an anatomy or a measurement,
    and swapping one in does not read as a different finding.
    """
    skip = {"No Finding", "Support Devices", "Pleural Other"}
    return [(c, c.lower()) for c in CHEXPERT_CATEGORIES if c not in skip]


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _sentence(text: str, m: Mention) -> tuple[int, int]:
    if m.sentence_end > m.sentence_start:
        return m.sentence_start, m.sentence_end
    start = text.rfind(".", 0, m.start) + 1
    end = text.find(".", m.end)
    return start, len(text) if end < 0 else end


def _swap_finding(
    text: str, m: Mention, mentions: Sequence[Mention], pool: Sequence[tuple[str, str]], rng: random.Random
) -> Edit | None:
    if m.category in (None, "No Finding") or m.certainty == "negative":
        return None
    present = {x.category for x in mentions if x.certainty != "negative"}
    choices = sorted({phrase for cat, phrase in pool if cat not in present and phrase != m.text.lower()})
    if not choices:
        return None
    return m.start, m.end, _match_case(text[m.start : m.end], rng.choice(choices))


def _flip_laterality(text: str, m: Mention, rng: random.Random) -> Edit | None:
    if m.laterality is None:
        return None
    s, e = _sentence(text, m)
    hits = list(_LATERALITY.finditer(text, s, e))
    if not hits:
        return None
    hit = min(hits, key=lambda h: abs(h.start() - m.start))
    word = hit.group(1).lower()
    new = _FLIP.get(word) or rng.choice(("left", "right"))
    return hit.start(), hit.end(), _match_case(hit.group(1), new)


def _flip_negation(text: str, m: Mention) -> Edit | None:
    s, _ = _sentence(text, m)
    if m.certainty == "negative":
        cues = [c for c in _NEGATION.finditer(text, s, m.start) if c.end() <= m.start]
        if not cues:
            return None
        cue = cues[-1]
        if cue.group(0)[:1].isupper() and cue.end() < len(text):  # "No pneumothorax." -> "Pneumothorax."
            return cue.start(), cue.end() + 1, text[cue.end()].upper()
        return cue.start(), cue.end(), ""
    if m.certainty == "positive":
        # Negate the noun phrase holding the mention: after the last verb/preposition before it, dropping an article.
        # "There is a large consolidation" -> "There is no large consolidation";
        # "Small left pleural effusion." -> "No small left pleural effusion."
        prefix = text[s : m.start]
        bounds = list(_PHRASE_BOUNDARY.finditer(prefix))
        at = s + (bounds[-1].end() if bounds else len(prefix) - len(prefix.lstrip()))
        article = re.match(r"(an?|the)\s+", text[at : m.start], flags=re.IGNORECASE)
        if article is not None:
            return at, at + article.end(), _match_case(article.group(1), "no ")
        if not bounds:  # phrase opens the sentence
            return at, at + 1, "No " + text[at].lower()
        return at, at, "no "
    return None


def make_counterfactual(
    text: str,
    mentions: Sequence[Mention],
    rng: random.Random,
    *,
    findings: Sequence[tuple[str, str]] | None = None,
    max_edits: int = 1,
) -> str | None:
    """A report with 1..``max_edits`` claims changed, or None when no mention can be edited.

    ``findings`` is the (category, phrase) replacement pool; the knowledge base's findings by default.
    """
    pool = default_findings() if findings is None else findings
    candidates: list[Edit] = []
    for m in mentions:
        if not (0 <= m.start < m.end <= len(text)):
            raise ValueError(f"mention {m.concept_id!r} span {m.start}:{m.end} is outside a text of {len(text)} chars")
        for edit in (
            _swap_finding(text, m, mentions, pool, rng),
            _flip_laterality(text, m, rng),
            _flip_negation(text, m),
        ):
            if edit is not None:
                candidates.append(edit)
    rng.shuffle(candidates)
    chosen: list[Edit] = []
    for edit in candidates:
        if len(chosen) == max_edits:
            break
        if all(edit[1] <= c[0] or edit[0] >= c[1] for c in chosen) and all(edit[0] != c[0] for c in chosen):
            chosen.append(edit)
    out = text
    for start, end, replacement in sorted(chosen, key=lambda e: e[0], reverse=True):
        out = out[:start] + replacement + out[end:]
    return out if chosen and out != text else None
