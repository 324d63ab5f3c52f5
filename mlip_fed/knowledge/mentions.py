"""What the report parser hands to everyone else: mentions with character spans.

The labeler aggregates them into CheXpert labels; the local alignment objective injects knowledge
over their spans; text swapping edits them into counterfactual reports. One small type keeps
those three in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Certainty = Literal["positive", "negative", "uncertain"]
Laterality = Literal["left", "right", "bilateral"]


@dataclass(frozen=True)
class Mention:
    """One concept mentioned in a report; ``start:end`` indexes the text that was parsed."""

    concept_id: str
    #: CheXpert category the concept maps to, or None (anatomy, devices without a category).
    category: str | None
    start: int
    end: int
    text: str
    certainty: Certainty
    laterality: Laterality | None = None
    #: Knowledge-base id of the anatomical location named with the mention ("right_lower_lobe").
    location: str | None = None
    #: Section the mention sits in ("findings", "impression", ...), lower-case.
    section: str | None = None
    #: Character span of the sentence holding the mention (text swapping edits within it).
    sentence_start: int = 0
    sentence_end: int = 0
