"""Radiology report structure: sections, sentences and clauses as character spans.

Everything downstream (the labeler, knowledge injection, text swapping) needs spans that index the
original text, so nothing here rewrites the report: it only finds boundaries. Negation and
uncertainty scope stops at clause boundaries, which is why clauses live here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Headers recognised case-insensitively anywhere a line starts. Free-form ALL-CAPS headers
#: ("WET READ:") are recognised too; these cover the title-case spellings seen in practice.
KNOWN_SECTIONS: tuple[str, ...] = (
    "findings",
    "impression",
    "conclusion",
    "conclusions",
    "indication",
    "indications",
    "history",
    "clinical history",
    "clinical information",
    "reason for exam",
    "reason for examination",
    "comparison",
    "comparisons",
    "technique",
    "examination",
    "exam",
    "procedure",
    "recommendation",
    "recommendations",
    "notification",
    "final report",
    "comment",
    "comments",
    "summary",
    "addendum",
    "wet read",
)

#: Sections whose text describes why the study was done, not what it shows; the labeler skips them.
NON_FINDING_SECTIONS: frozenset[str] = frozenset(
    {
        "indication",
        "indications",
        "history",
        "clinical history",
        "clinical information",
        "reason for exam",
        "reason for examination",
        "comparison",
        "comparisons",
        "technique",
        "examination",
        "exam",
        "procedure",
        "notification",
    }
)

_KNOWN = "|".join(sorted((re.escape(s).replace(r"\ ", r"\s+") for s in KNOWN_SECTIONS), key=len, reverse=True))
_HEADER_RE = re.compile(
    rf"(?:^|(?<=\n))[ \t]*(?P<name>(?i:{_KNOWN})|[A-Z][A-Z /&]{{1,40}}[A-Z])[ \t]*:",
)
_ABBREVIATIONS = frozenset({"vs", "e.g", "i.e", "dr", "mr", "mrs", "ms", "approx", "etc", "st"})
# A list marker ("1. ", "2) ") at the start of the text or after whitespace starts a new sentence.
_LIST_MARKER_RE = re.compile(r"(?:(?<=\s)|^)\(?\d{1,2}[.)](?=\s|[A-Za-z])\s*")
# Sentence-final punctuation followed by whitespace, end of text, or a capital letter ("apex.There").
_BARE_MARKER_RE = re.compile(r"\(?\d{1,2}[.)]")
_SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$|[A-Z])")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
# Words and punctuation that start a new clause: negation and uncertainty never reach across them.
_CLAUSE_BREAK_RE = re.compile(
    r";|:|\s-\s|\b(?:but|however|although|though|which|whereas|while|otherwise|except|aside from|apart from|"
    r"other than|and there|there is|there are|there has|there have)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Section:
    """A report section; ``name`` is the lower-cased header, None for a report without headers."""

    name: str | None
    start: int
    end: int


@dataclass(frozen=True)
class Sentence:
    """A sentence span and the section it belongs to."""

    start: int
    end: int
    section: str | None


def split_sections(text: str) -> list[Section]:
    """Split at headers ("FINDINGS:", "Impression:"); text before the first header is its own section.

    A report with no header is one section named None, so callers never need a special case.
    """
    headers = list(_HEADER_RE.finditer(text))
    if not headers:
        return [Section(None, 0, len(text))] if text.strip() else []
    sections: list[Section] = []
    if text[: headers[0].start()].strip():
        sections.append(Section(None, 0, headers[0].start()))
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        name = " ".join(match.group("name").lower().split())
        sections.append(Section(name, match.end(), end))
    return sections


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentence spans (start, end) within ``text[start:end]``, stripped of whitespace and list markers."""
    end = len(text) if end is None else end
    cuts = {start, end}
    for match in _SENTENCE_END_RE.finditer(text, start, end):
        if not _is_abbreviation(text, match.start()) and not _is_decimal(text, match.start(), end):
            cuts.add(match.end())
    for match in _LIST_MARKER_RE.finditer(text, start, end):
        cuts.add(match.start())
        cuts.add(match.end())
    for match in _PARAGRAPH_RE.finditer(text, start, end):
        cuts.add(match.start())
    spans: list[tuple[int, int]] = []
    ordered = sorted(cuts)
    for left, right in zip(ordered, ordered[1:], strict=False):
        left, right = _strip(text, left, right)
        piece = text[left:right]
        if right > left and not _BARE_MARKER_RE.fullmatch(piece) and re.search(r"\w", piece):
            spans.append((left, right))
    return spans


def split_report(text: str) -> list[Sentence]:
    """All sentences of a report with their section names, in text order."""
    return [
        Sentence(s, e, section.name)
        for section in split_sections(text)
        for s, e in split_sentences(text, section.start, section.end)
    ]


def split_clauses(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Clause spans inside one sentence; a break word belongs to the clause it opens."""
    cuts = [start]
    for match in _CLAUSE_BREAK_RE.finditer(text, start, end):
        cuts.append(match.start())
    cuts.append(end)
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _is_abbreviation(text: str, dot: int) -> bool:
    word = re.search(r"([A-Za-z.]+)$", text[max(0, dot - 8) : dot])
    return bool(word) and word.group(1).lower() in _ABBREVIATIONS


def _is_decimal(text: str, dot: int, end: int) -> bool:
    return dot > 0 and text[dot - 1].isdigit() and dot + 1 < end and text[dot + 1].isdigit()


def _strip(text: str, left: int, right: int) -> tuple[int, int]:
    while left < right and text[left].isspace():
        left += 1
    while right > left and text[right - 1].isspace():
        right -= 1
    return left, right
