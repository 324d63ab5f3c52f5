"""MIMIC-CXR-JPG v2 reader: one ``StudyRecord`` per (frontal) JPG, text = FINDINGS + IMPRESSION.

Layout (PhysioNet ``mimic-cxr-jpg`` 2.0.0/2.1.0; the CSVs keep the 2.0.0 names, gzipped or not)::

    root/mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, ...
    root/mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split
    root/mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, <14 CheXpert labels>
    root/files/p10/p10000032/s50414267/<dicom_id>.jpg

Reports come from the MIMIC-CXR (DICOM) project as ``files/p10/p10000032/s50414267.txt``; they are
usually unpacked elsewhere, hence ``reports_root``. Images join the split by ``dicom_id`` and the
labels by ``(subject_id, study_id)``, as in MGCA's preprocessing.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mlip_fed.data.manifest import (
    FILTERED,
    SKIP_EMPTY_REPORT,
    SKIP_IMAGE_NOT_FOUND,
    RowSkipped,
    normalise_split,
    parse_labels,
    read_report_file,
)
from mlip_fed.data.records import SkipReport, StudyRecord
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.report import split_sections

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SKIP_NO_SPLIT = "no split entry"

_METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
_SPLIT_COLUMNS = ("dicom_id", "split")
_LABEL_COLUMNS = ("subject_id", "study_id", *CHEXPERT_CATEGORIES)

_FINDINGS_SECTIONS = ("findings", "finding")
_IMPRESSION_SECTIONS = ("impression", "impressions", "conclusion", "conclusions")


def findings_impression(text: str) -> str:
    """``FINDINGS: ...`` and ``IMPRESSION: ...`` lines; with neither, the last paragraph (as MGCA).

    Sections come from the shared report parser (``mlip_fed.knowledge.report``), so the reader and
    the labeler agree on what a header is. Headers are kept so the parser and labeler downstream
    still see sections, as SynthCXR reports carry them. Whitespace (MIMIC wraps lines) is collapsed.
    """
    bodies: dict[str, list[str]] = {}
    for section in split_sections(text):
        body = " ".join(text[section.start : section.end].split())
        if section.name is not None and body:
            bodies.setdefault(section.name, []).append(body)
    findings = " ".join(b for name in _FINDINGS_SECTIONS for b in bodies.get(name, []))
    impression = " ".join(b for name in _IMPRESSION_SECTIONS for b in bodies.get(name, []))
    parts = [f"FINDINGS: {findings}"] if findings else []
    if impression:
        parts.append(f"IMPRESSION: {impression}")
    if parts:
        return "\n".join(parts)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


def read_mimic(
    root: str | Path,
    *,
    reports_root: str | Path | None = None,
    views: Sequence[str] | None = ("PA", "AP"),
    splits: Iterable[str] | None = None,
    site_id: str | None = None,
) -> tuple[list[StudyRecord], SkipReport]:
    """Records for every JPG whose view is in ``views`` (None: all) and split in ``splits`` (None: all).

    Splits are normalised to ``train`` / ``val`` / ``test`` (MIMIC's ``validate`` becomes ``val``).
    Missing CSVs or columns raise; missing images or reports, non-UTF-8 or empty reports and bad
    label cells skip the image, counted in the ``SkipReport``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR-JPG root {root} is not a directory")
    reports_dir = _reports_dir(Path(reports_root) if reports_root is not None else root)
    wanted_views = None if views is None else {v.upper() for v in views}
    wanted_splits = None if splits is None else {normalise_split(s) for s in splits}

    split_by_dicom = {
        row["dicom_id"]: normalise_split(row["split"]) for _, row in _read_csv(root, SPLIT_CSV, _SPLIT_COLUMNS)
    }
    labels_by_study: dict[tuple[str, str], tuple[float, ...] | RowSkipped] = {}
    for where, row in _read_csv(root, CHEXPERT_CSV, _LABEL_COLUMNS):
        key = (_id(row["subject_id"]), _id(row["study_id"]))
        try:
            labels_by_study[key] = parse_labels(row, where)
        except RowSkipped as skipped:
            labels_by_study[key] = skipped

    report = SkipReport()
    records: list[StudyRecord] = []
    report_cache: dict[Path, str | RowSkipped] = {}
    for where, row in _read_csv(root, METADATA_CSV, _METADATA_COLUMNS):
        dicom_id, subject_id, study_id = row["dicom_id"].strip(), _id(row["subject_id"]), _id(row["study_id"])
        view = row["ViewPosition"].strip().upper() or None
        if wanted_views is not None and view not in wanted_views:
            report.skip(f"{FILTERED}: view not in {sorted(wanted_views)}", f"{where}: {dicom_id} ({view})")
            continue
        split = split_by_dicom.get(dicom_id)
        if split is None:
            report.skip(SKIP_NO_SPLIT, f"{where}: {dicom_id}")
            continue
        if wanted_splits is not None and split not in wanted_splits:
            report.skip(f"{FILTERED}: split not in {sorted(wanted_splits)}", f"{where}: {dicom_id} ({split})")
            continue
        study_dir = Path("files", f"p{subject_id[:2]}", f"p{subject_id}")
        image_path = root / study_dir / f"s{study_id}" / f"{dicom_id}.jpg"
        if not image_path.is_file():
            report.skip(SKIP_IMAGE_NOT_FOUND, f"{where}: {image_path}")
            continue
        report_path = reports_dir / study_dir.relative_to("files") / f"s{study_id}.txt"
        text = report_cache.get(report_path)
        if text is None:
            text = report_cache[report_path] = _study_text(report_path, where)
        labels = labels_by_study.get((subject_id, study_id), tuple(math.nan for _ in CHEXPERT_CATEGORIES))
        problem = text if isinstance(text, RowSkipped) else labels if isinstance(labels, RowSkipped) else None
        if problem is not None:
            report.skip(problem.reason, problem.detail)
            continue
        records.append(
            StudyRecord(
                image_path=image_path,
                report=text,
                patient_id=subject_id,
                study_id=study_id,
                split=split,
                view=view,
                site_id=site_id,
                labels=labels,
            )
        )
    report.loaded = len(records)
    return records, report


def _study_text(path: Path, where: str) -> str | RowSkipped:
    try:
        text = findings_impression(read_report_file(path, where))
    except RowSkipped as skipped:
        return skipped
    return text if text else RowSkipped(SKIP_EMPTY_REPORT, f"{where}: {path} has no FINDINGS/IMPRESSION text")


def _reports_dir(reports_root: Path) -> Path:
    """The folder holding ``pXX/``: ``reports_root/files`` when present, else ``reports_root`` itself."""
    if not reports_root.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR reports root {reports_root} is not a directory")
    files = reports_root / "files"
    return files if files.is_dir() else reports_root


def _id(value: str) -> str:
    """Ids as digits: MIMIC CSVs sometimes hold ``10000032.0`` after a round trip through pandas."""
    text = value.strip()
    return text[:-2] if text.endswith(".0") else text


def _read_csv(root: Path, name: str, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of ``name`` or ``name.gz`` with a ``file:line`` location; missing file/columns raise."""
    plain, gzipped = root / name, root / f"{name}.gz"
    if plain.is_file():
        path, handle = plain, plain.open(encoding="utf-8", newline="")
    elif gzipped.is_file():
        path, handle = gzipped, io.TextIOWrapper(gzip.open(gzipped), encoding="utf-8", newline="")
    else:
        raise FileNotFoundError(f"MIMIC-CXR-JPG root {root}: neither {name} nor {name}.gz exists")
    with handle:
        reader = csv.DictReader(handle)
        found = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in required if c not in found]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(required)}, found {found}")
        reader.fieldnames = found
        for row in reader:
            yield f"{path.name}:{reader.line_num}", row
