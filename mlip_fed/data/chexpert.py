"""CheXpert v1.0 reader (``train.csv`` / ``valid.csv``) for evaluation: images and labels, no reports.

CheXpert ships no report text, so its records carry ``report=""`` and serve the linear probe and
zero-shot evaluation; pretraining sites use MIMIC-CXR or a manifest. The uncertainty policy maps
the ``-1`` (uncertain) labels; blank cells ("not mentioned") stay NaN unless
``blank_as_negative`` turns them into 0 as MGCA's fine-tuning loaders do.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from mlip_fed.data.manifest import FILTERED, SKIP_IMAGE_NOT_FOUND, RowSkipped, parse_labels
from mlip_fed.data.records import SkipReport, StudyRecord
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

UncertaintyPolicy = Literal["u_ones", "u_zeros", "keep", "mgca"]
POLICIES: tuple[str, ...] = ("u_ones", "u_zeros", "keep", "mgca")
#: MGCA/GLoRIA (``mgca/constants.py``): U-Ones for these, U-Zeros for every other category.
MGCA_U_ONES: frozenset[str] = frozenset({"Atelectasis", "Edema", "Pleural Effusion"})
CHEXPERT_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CATEGORIES)


def uncertain_value(policy: UncertaintyPolicy) -> Mapping[str, float]:
    """What ``-1`` becomes per category under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; expected one of {POLICIES}")
    if policy == "keep":
        return dict.fromkeys(CHEXPERT_CATEGORIES, -1.0)
    if policy == "u_ones":
        return dict.fromkeys(CHEXPERT_CATEGORIES, 1.0)
    if policy == "u_zeros":
        return dict.fromkeys(CHEXPERT_CATEGORIES, 0.0)
    return {name: 1.0 if name in MGCA_U_ONES else 0.0 for name in CHEXPERT_CATEGORIES}


def apply_policy(
    labels: tuple[float, ...], policy: UncertaintyPolicy, *, blank_as_negative: bool = False
) -> tuple[float, ...]:
    """Map uncertain (and optionally blank) labels; positives and negatives never change."""
    mapping = uncertain_value(policy)
    out = []
    for name, value in zip(CHEXPERT_CATEGORIES, labels, strict=True):
        if value == -1.0:
            value = mapping[name]
        elif math.isnan(value) and blank_as_negative:
            value = 0.0
        out.append(value)
    return tuple(out)


def read_chexpert(
    csv_path: str | Path,
    image_root: str | Path,
    *,
    policy: UncertaintyPolicy = "keep",
    frontal_only: bool = True,
    require_report: bool = False,
    blank_as_negative: bool = False,
    site_id: str | None = None,
) -> tuple[list[StudyRecord], SkipReport]:
    """Records for a CheXpert CSV; ``Path`` values are resolved under ``image_root``.

    ``image_root`` may be the folder that holds ``CheXpert-v1.0-small/`` or that folder itself (its
    name then matches the first part of ``Path`` and is not repeated). Patient ids are
    ``patientNNNNN``; study ids ``patientNNNNN/studyN`` because study numbers restart per patient.
    ``require_report=True`` is refused: CheXpert has no reports, so it cannot feed pretraining.
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    if require_report:
        raise ValueError(
            f"{csv_path}: CheXpert has no report text; read it with require_report=False (evaluation only)"
        )
    uncertain_value(policy)  # validate the policy before reading anything
    if not image_root.is_dir():
        raise FileNotFoundError(f"CheXpert image root {image_root} is not a directory")
    try:
        with csv_path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            found = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in CHEXPERT_COLUMNS if name not in found]
            if missing:
                raise ValueError(
                    f"{csv_path}: missing column(s) {missing}; expected {list(CHEXPERT_COLUMNS)}, found {found}"
                )
            reader.fieldnames = found
            rows = [(f"{csv_path.name}:{reader.line_num}", row) for row in reader]
    except UnicodeDecodeError as err:
        raise ValueError(f"{csv_path}: not UTF-8 (byte {err.start})") from None

    report = SkipReport()
    records: list[StudyRecord] = []
    for where, row in rows:
        frontal = row["Frontal/Lateral"].strip().lower() == "frontal"
        if frontal_only and not frontal:
            report.skip(f"{FILTERED}: lateral view", where)
            continue
        try:
            record = _row_to_record(row, where, image_root, policy, blank_as_negative, frontal, site_id)
        except RowSkipped as skipped:
            report.skip(skipped.reason, skipped.detail)
            continue
        records.append(record)
    report.loaded = len(records)
    return records, report


def _row_to_record(
    row: dict[str, str],
    where: str,
    image_root: Path,
    policy: UncertaintyPolicy,
    blank_as_negative: bool,
    frontal: bool,
    site_id: str | None,
) -> StudyRecord:
    relative = Path(row["Path"].strip())
    parts = relative.parts
    if parts and parts[0] == image_root.name:
        relative = Path(*parts[1:])
    image_path = image_root / relative
    if not image_path.is_file():
        raise RowSkipped(SKIP_IMAGE_NOT_FOUND, f"{where}: {image_path}")
    patient = next((p for p in parts if p.startswith("patient")), None)
    study = next((p for p in parts if p.startswith("study")), None)
    if patient is None or study is None:
        raise RowSkipped("no patient/study in Path", f"{where}: {row['Path']!r}")
    labels = apply_policy(parse_labels(row, where), policy, blank_as_negative=blank_as_negative)
    split = "val" if "valid" in parts else "test" if "test" in parts else "train"
    view = (row["AP/PA"].strip().upper() or None) if frontal else "LATERAL"
    return StudyRecord(
        image_path=image_path,
        report="",
        patient_id=patient,
        study_id=f"{patient}/{study}",
        split=split,
        view=view,
        site_id=site_id,
        labels=labels,
    )
