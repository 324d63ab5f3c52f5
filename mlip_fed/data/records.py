"""The one in-memory form every reader produces, and the tally of what it skipped.

Readers for MIMIC-CXR-JPG, CheXpert, the CSV manifest and SynthCXR all yield ``StudyRecord``s, so
the dataset, the partitioner and the trainer never care where the data came from.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

#: Manifest columns every site must provide (``report_text`` or ``report_path`` is also required).
MANIFEST_REQUIRED_COLUMNS: tuple[str, ...] = ("image_path", "patient_id", "study_id")
MANIFEST_REPORT_COLUMNS: tuple[str, ...] = ("report_text", "report_path")
MANIFEST_OPTIONAL_COLUMNS: tuple[str, ...] = ("split", "view", "site_id", "mask_path", *CHEXPERT_CATEGORIES)


@dataclass(frozen=True)
class StudyRecord:
    """One image with its report. Labels follow CheXpert: 1.0, 0.0, -1.0, or NaN (not mentioned)."""

    image_path: Path
    report: str
    patient_id: str
    study_id: str
    split: str = "train"
    view: str | None = None
    site_id: str | None = None
    labels: tuple[float, ...] = tuple(math.nan for _ in CHEXPERT_CATEGORIES)
    #: Optional multi-finding segmentation mask (SynthCXR writes one PNG per study).
    mask_path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(CHEXPERT_CATEGORIES):
            raise ValueError(
                f"study {self.study_id}: expected {len(CHEXPERT_CATEGORIES)} labels, got {len(self.labels)}"
            )


@dataclass
class SkipReport:
    """Why records were dropped: counted per reason, with a few examples each, never silently."""

    loaded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < self.max_examples:
            bucket.append(where)

    def merge(self, other: SkipReport) -> None:
        self.loaded += other.loaded
        self.skipped.update(other.skipped)
        for reason, items in other.examples.items():
            bucket = self.examples.setdefault(reason, [])
            bucket.extend(items[: max(0, self.max_examples - len(bucket))])

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"loaded: {self.loaded}", f"skipped: {self.total_skipped}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}  e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)
