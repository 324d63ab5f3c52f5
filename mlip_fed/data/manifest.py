"""Read a site's CSV manifest into ``StudyRecord``s.

A manifest is the one format a hospital has to produce: one row per image, with its report (inline
or as a UTF-8 file), ids and optional CheXpert labels. Column mistakes are configuration errors and
stop the load at once; row mistakes (a missing file, an empty report) are data errors and only skip
that row, counted per reason in a ``SkipReport`` so a site sees exactly what it lost.

The label and report-file helpers here are shared by the MIMIC-CXR and CheXpert readers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from mlip_fed.data.records import (
    MANIFEST_OPTIONAL_COLUMNS,
    MANIFEST_REPORT_COLUMNS,
    MANIFEST_REQUIRED_COLUMNS,
    SkipReport,
    StudyRecord,
)
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

# Skip reasons: fixed phrases so ``mlip-data check`` and docs/data.md can count and explain them.
SKIP_MISSING_PATIENT = "missing patient_id"
SKIP_MISSING_STUDY = "missing study_id"
SKIP_MISSING_IMAGE_PATH = "missing image_path"
SKIP_IMAGE_NOT_FOUND = "image file not found"
SKIP_DUPLICATE_IMAGE = "duplicate image_path"
SKIP_MASK_NOT_FOUND = "mask file not found"
SKIP_REPORT_NOT_FOUND = "report file not found"
SKIP_REPORT_NOT_UTF8 = "report not UTF-8"
SKIP_EMPTY_REPORT = "empty report"
SKIP_BAD_LABEL = "bad label value"
#: Prefix of reasons for rows the caller asked to leave out (split, view); counted, never silent.
FILTERED = "filtered"

#: The only label values CheXpert-style files may hold; blank means "not mentioned" (NaN).
LABEL_VALUES: frozenset[float] = frozenset({1.0, 0.0, -1.0})

#: Spellings of the validation split across datasets, mapped to the manifest's ``val``.
_SPLIT_ALIASES = {"validate": "val", "valid": "val", "validation": "val"}


class RowSkipped(Exception):
    """One row cannot become a record; ``reason`` is what the SkipReport counts."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalise_split(value: str) -> str:
    """``train`` / ``val`` / ``test`` whatever the source called them (MIMIC says ``validate``)."""
    value = value.strip().lower()
    return _SPLIT_ALIASES.get(value, value)


def parse_label(value: str | None) -> float:
    """CheXpert cell → 1.0 / 0.0 / -1.0, blank → NaN; anything else raises ValueError."""
    text = (value or "").strip()
    if not text:
        return math.nan
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not one of 1, 0, -1 or blank") from None
    if number not in LABEL_VALUES:
        raise ValueError(f"label {text!r} is not one of 1, 0, -1 or blank")
    return number


def parse_labels(row: dict[str, str], where: str) -> tuple[float, ...]:
    """The 14 CheXpert columns of ``row`` (absent columns are NaN), or ``RowSkipped``."""
    labels = []
    for name in CHEXPERT_CATEGORIES:
        try:
            labels.append(parse_label(row.get(name)))
        except ValueError as err:
            raise RowSkipped(SKIP_BAD_LABEL, f"{where} column {name!r}: {err}") from None
    return tuple(labels)


def read_report_file(path: Path, where: str) -> str:
    """A report file's text, stripped; missing, non-UTF-8 or blank files raise ``RowSkipped``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RowSkipped(SKIP_REPORT_NOT_FOUND, f"{where}: {path}") from None
    except IsADirectoryError:
        raise RowSkipped(SKIP_REPORT_NOT_FOUND, f"{where}: {path} is a directory") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RowSkipped(SKIP_REPORT_NOT_UTF8, f"{where}: {path} (byte {err.start})") from None
    text = text.strip()
    if not text:
        raise RowSkipped(SKIP_EMPTY_REPORT, f"{where}: {path}")
    return text


def resolve_path(value: str, base: Path) -> Path:
    """Absolute paths stay; relative ones are taken from the manifest's folder, not the CWD."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def check_columns(path: Path, found: Sequence[str]) -> None:
    """Fail at load, naming the file and both column lists, on missing, unknown or repeated columns."""
    expected = (*MANIFEST_REQUIRED_COLUMNS, *MANIFEST_REPORT_COLUMNS, *MANIFEST_OPTIONAL_COLUMNS)
    problems = []
    missing = [name for name in MANIFEST_REQUIRED_COLUMNS if name not in found]
    if missing:
        problems.append(f"missing required column(s) {missing}")
    if not any(name in found for name in MANIFEST_REPORT_COLUMNS):
        problems.append(f"needs one of {list(MANIFEST_REPORT_COLUMNS)}")
    unknown = [name for name in found if name not in expected]
    if unknown:
        problems.append(f"unknown column(s) {unknown}")
    repeated = sorted({name for name in found if list(found).count(name) > 1})
    if repeated:
        problems.append(f"repeated column(s) {repeated}")
    if problems:
        raise ValueError(
            f"manifest {path}: {'; '.join(problems)}. Expected required {list(MANIFEST_REQUIRED_COLUMNS)}, "
            f"one of {list(MANIFEST_REPORT_COLUMNS)}, optional {list(MANIFEST_OPTIONAL_COLUMNS)}; "
            f"found {list(found)}"
        )


def read_manifest(
    path: str | Path,
    *,
    splits: Iterable[str] | None = None,
    require_report: bool = True,
) -> tuple[list[StudyRecord], SkipReport]:
    """Load a manifest; rows outside ``splits`` are counted as filtered, bad rows as skipped.

    ``require_report=False`` admits rows without report text (evaluation-only manifests); the
    record's ``report`` is then ``""``.
    """
    path = Path(path)
    wanted = None if splits is None else {normalise_split(s) for s in splits}
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"manifest {path}: file is empty (no header row)")
            header = [name.strip() for name in header]
            check_columns(path, header)
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as err:
        raise ValueError(f"manifest {path}: not UTF-8 (byte {err.start})") from None
    except csv.Error as err:
        raise ValueError(f"manifest {path}: malformed CSV: {err}") from None

    base = path.parent
    report = SkipReport()
    records: list[StudyRecord] = []
    seen_images: set[Path] = set()
    for line, cells in rows:
        if not any(cell.strip() for cell in cells):
            continue  # blank line, e.g. a trailing newline pair from a spreadsheet export
        where = f"{path.name}:{line}"
        if len(cells) != len(header):
            report.skip("wrong number of cells", f"{where}: {len(cells)} cells for {len(header)} columns")
            continue
        row = dict(zip(header, cells, strict=True))
        split = normalise_split(row.get("split") or "train")
        if wanted is not None and split not in wanted:
            report.skip(f"{FILTERED}: split not in {sorted(wanted)}", f"{where}: {split}")
            continue
        try:
            record = _row_to_record(row, base, where, split, require_report)
        except RowSkipped as skipped:
            report.skip(skipped.reason, skipped.detail)
            continue
        if record.image_path in seen_images:
            report.skip(SKIP_DUPLICATE_IMAGE, f"{where}: {record.image_path}")
            continue
        seen_images.add(record.image_path)
        records.append(record)
    report.loaded = len(records)
    return records, report


def _row_to_record(row: dict[str, str], base: Path, where: str, split: str, require_report: bool) -> StudyRecord:
    patient_id = row["patient_id"].strip()
    study_id = row["study_id"].strip()
    if not patient_id:
        raise RowSkipped(SKIP_MISSING_PATIENT, where)
    if not study_id:
        raise RowSkipped(SKIP_MISSING_STUDY, where)
    image_value = row["image_path"].strip()
    if not image_value:
        raise RowSkipped(SKIP_MISSING_IMAGE_PATH, where)
    image_path = resolve_path(image_value, base)
    if not image_path.is_file():
        raise RowSkipped(SKIP_IMAGE_NOT_FOUND, f"{where}: {image_path}")
    mask_value = (row.get("mask_path") or "").strip()
    mask_path = resolve_path(mask_value, base) if mask_value else None
    if mask_path is not None and not mask_path.is_file():
        raise RowSkipped(SKIP_MASK_NOT_FOUND, f"{where}: {mask_path}")
    labels = parse_labels(row, where)
    text = _row_report(row, base, where, require_report)
    return StudyRecord(
        image_path=image_path,
        report=text,
        patient_id=patient_id,
        study_id=study_id,
        split=split,
        view=(row.get("view") or "").strip() or None,
        site_id=(row.get("site_id") or "").strip() or None,
        labels=labels,
        mask_path=mask_path,
    )


def _row_report(row: dict[str, str], base: Path, where: str, require_report: bool) -> str:
    """Inline ``report_text`` wins; otherwise ``report_path`` is read as UTF-8."""
    text = (row.get("report_text") or "").strip()
    if text:
        return text
    report_value = (row.get("report_path") or "").strip()
    if report_value:
        try:
            return read_report_file(resolve_path(report_value, base), where)
        except RowSkipped as skipped:
            if skipped.reason == SKIP_EMPTY_REPORT and not require_report:
                return ""
            raise
    if require_report:
        raise RowSkipped(SKIP_EMPTY_REPORT, where)
    return ""
