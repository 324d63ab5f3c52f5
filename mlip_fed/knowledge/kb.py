"""The shared medical knowledge base and its loader.

Every site loads the same file shipped inside the package, so knowledge prototypes, zero-shot
prompts, the labeler's vocabulary and the synthetic report generator agree everywhere without
any site's private text shaping them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: The 14 CheXpert observations in the column order of CheXpert's ``train.csv``.
CHEXPERT_CATEGORIES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

DEFAULT_KB_FILE = "chexpert14.json"


class Concept(BaseModel):
    """One concept: a finding, an anatomical location, a device or a modifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    cui: str | None = Field(default=None, pattern=r"^C\d{7}$")
    synonyms: tuple[str, ...] = ()
    abbreviations: tuple[str, ...] = ()
    #: Phrases that contain a mention but must not count as one ("pericardial effusion").
    unmention: tuple[str, ...] = ()
    definition: str
    group: Literal["finding", "anatomy", "device", "modifier"]
    chexpert_category: str | None = None
    #: Free attributes (location, severity, laterality vocabularies) for prompts and synthesis.
    attributes: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("chexpert_category")
    @classmethod
    def _known_category(cls, value: str | None) -> str | None:
        if value is not None and value not in CHEXPERT_CATEGORIES:
            raise ValueError(f"unknown CheXpert category {value!r}; expected one of {CHEXPERT_CATEGORIES}")
        return value

    @property
    def surface_forms(self) -> tuple[str, ...]:
        """Every string that mentions this concept, longest first (greedy matching wants that)."""
        forms = {self.name.lower(), *(s.lower() for s in self.synonyms), *(a.lower() for a in self.abbreviations)}
        return tuple(sorted(forms, key=lambda s: (-len(s), s)))

    @property
    def knowledge_text(self) -> str:
        """The "name: definition" string the text tower encodes into a knowledge token."""
        return f"{self.name}: {self.definition}"


class KnowledgeBase(BaseModel):
    """The whole knowledge base: concepts plus per-category prompt text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    concepts: tuple[Concept, ...]
    #: Per CheXpert category: a description used to initialise its knowledge prototype.
    category_descriptions: dict[str, str]
    #: Per CheXpert category: positive and negative zero-shot prompts.
    prompts_positive: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    prompts_negative: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("concepts")
    @classmethod
    def _unique_ids(cls, value: tuple[Concept, ...]) -> tuple[Concept, ...]:
        seen: set[str] = set()
        for concept in value:
            if concept.id in seen:
                raise ValueError(f"duplicate concept id {concept.id!r}")
            seen.add(concept.id)
        return value

    @field_validator("category_descriptions")
    @classmethod
    def _all_categories(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [c for c in CHEXPERT_CATEGORIES if c not in value]
        unknown = [c for c in value if c not in CHEXPERT_CATEGORIES]
        if missing or unknown:
            raise ValueError(f"category_descriptions: missing {missing}, unknown {unknown}")
        return value

    def concept(self, concept_id: str) -> Concept:
        for concept in self.concepts:
            if concept.id == concept_id:
                return concept
        raise KeyError(f"no concept with id {concept_id!r} in knowledge base {self.version}")

    def by_group(self, group: str) -> tuple[Concept, ...]:
        return tuple(c for c in self.concepts if c.group == group)

    def for_category(self, category: str) -> tuple[Concept, ...]:
        """Concepts that map to one CheXpert category."""
        if category not in CHEXPERT_CATEGORIES:
            raise KeyError(f"unknown CheXpert category {category!r}")
        return tuple(c for c in self.concepts if c.chexpert_category == category)

    def category_text(self, category: str) -> str:
        """Text that initialises the category's knowledge prototype: name plus description."""
        return f"{category}: {self.category_descriptions[category]}"


def load_knowledge_base(path: str | Path | None = None) -> KnowledgeBase:
    """Load and validate a knowledge base; the packaged one when ``path`` is None."""
    if path is None:
        return _packaged_knowledge_base()
    return _parse(Path(path).read_text(encoding="utf-8"), str(path))


@lru_cache(maxsize=1)
def _packaged_knowledge_base() -> KnowledgeBase:
    text = resources.files("mlip_fed.knowledge").joinpath(DEFAULT_KB_FILE).read_text(encoding="utf-8")
    return _parse(text, f"mlip_fed/knowledge/{DEFAULT_KB_FILE}")


def _parse(text: str, origin: str) -> KnowledgeBase:
    try:
        return KnowledgeBase.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise ValueError(f"{origin}: not valid JSON: {err}") from err
    except ValidationError as err:
        raise ValueError(f"{origin}: invalid knowledge base:\n{err}") from err
