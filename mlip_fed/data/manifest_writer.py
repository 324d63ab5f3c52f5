"""Write SynthCXR sites to disk in the project's CSV-manifest format.

Per site: ``site_<k>/images/<study>.png`` (8-bit grey), ``site_<k>/masks/<study>.png`` (8-bit label
map: 0 background, k = ``MASK_CLASS_NAMES[k-1]``), ``site_<k>/findings.jsonl`` (one line per finding
with its full-mask bounding box) and ``site_<k>/manifest.csv``. The manifest is written last and
atomically: a site folder without a manifest is an interrupted run, never a half-valid dataset.
Bytes are identical for the same arguments (no timestamps; Pillow's PNG writer is deterministic).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_fed.data.synthetic import (
    FINDINGS,
    MASK_INDEX,
    STREAM_PATIENT,
    STREAM_SPLIT,
    STREAM_STUDY,
    SiteProfile,
    Study,
    assign_splits,
    choose_view,
    make_site_profiles,
    plan_patients,
    render_study,
    same_findings,
    sample_anatomy,
    sample_findings,
    seeded_rng,
)
from mlip_fed.data.synthetic_reports import write_report
from mlip_fed.io import atomic_write_text
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, load_knowledge_base

#: Column order of every SynthCXR manifest.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_path",
    "report_text",
    "patient_id",
    "study_id",
    "split",
    "view",
    "site_id",
    "mask_path",
    *CHEXPERT_CATEGORIES,
)


def format_label(value: float) -> str:
    """CheXpert cell text: ``1.0`` / ``0.0`` / ``-1.0``, blank for NaN (not mentioned)."""
    if math.isnan(value):
        return ""
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label {value!r} is not one of 1.0, 0.0, -1.0 or NaN")
    return f"{value:.1f}"


def write_manifest(path: str | Path, rows: Iterable[dict[str, object]]) -> Path:
    """Atomically write a manifest CSV with ``MANIFEST_COLUMNS``; label values are floats or NaN."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for i, row in enumerate(rows):
        missing = [c for c in MANIFEST_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"manifest {path} row {i}: missing columns {missing}")
        writer.writerow(
            format_label(float(row[c])) if c in CHEXPERT_CATEGORIES else str(row[c])
            for c in MANIFEST_COLUMNS  # type: ignore[arg-type]
        )
    return atomic_write_text(path, buffer.getvalue())


def write_png(path: Path, array: np.ndarray) -> None:
    """8-bit greyscale PNG; plain write (the manifest, written last, is the commit point)."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D uint8 array, got {array.dtype} {array.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def write_site(
    out_dir: Path,
    site_index: int,
    profile: SiteProfile,
    num_studies: int,
    image_size: int,
    seed: int,
    test_fraction: float,
    difficulty: str = "standard",
) -> Path:
    """Generate and write one site; randomness depends only on ``(seed, site_index, patient, study)``.

    ``difficulty`` (a SynthCXR tier) changes the pixels only: rows, reports and labels are the same in every tier.
    """
    kb = load_knowledge_base()
    site_dir = out_dir / profile.site_id
    counts = plan_patients(num_studies, profile.studies_per_patient, seeded_rng(seed, STREAM_SPLIT, site_index, 0))
    splits = assign_splits(len(counts), test_fraction, seeded_rng(seed, STREAM_SPLIT, site_index, 1))
    rows: list[dict[str, object]] = []
    finding_lines: list[str] = []
    for p, (n_studies, split) in enumerate(zip(counts, splits, strict=True)):
        patient_id = f"{profile.site_id}_p{p:05d}"
        anatomy = sample_anatomy(seeded_rng(seed, STREAM_PATIENT, site_index, p))
        prior = None
        for j in range(n_studies):
            rng = seeded_rng(seed, STREAM_STUDY, site_index, p, j)
            findings = sample_findings(profile, rng, prior)
            study = Study(
                site_id=profile.site_id,
                patient_id=patient_id,
                study_id=f"{patient_id}_s{j:02d}",
                follow_up=j,
                view=choose_view(profile, findings, rng),
                findings=findings,
                has_prior=prior is not None,
                unchanged=prior is not None and same_findings(prior, findings),
            )
            rendered = render_study(anatomy, findings, profile, study.view, image_size, rng, difficulty)
            report = write_report(study, profile.report_style, rng, kb)
            image_rel = f"images/{study.study_id}.png"
            mask_rel = f"masks/{study.study_id}.png"
            write_png(site_dir / image_rel, rendered.image)
            write_png(site_dir / mask_rel, rendered.label_mask)
            row: dict[str, object] = {
                "image_path": image_rel,
                "report_text": report.text,
                "patient_id": patient_id,
                "study_id": study.study_id,
                "split": split,
                "view": study.view,
                "site_id": profile.site_id,
                "mask_path": mask_rel,
            }
            row.update(zip(CHEXPERT_CATEGORIES, report.labels, strict=True))
            rows.append(row)
            for f in findings:
                finding_lines.append(
                    json.dumps(
                        {
                            "study_id": study.study_id,
                            "finding": f.kind,
                            "mask_index": MASK_INDEX[f.kind],
                            "categories": list(FINDINGS[f.kind].categories),
                            "laterality": f.laterality,
                            "location": f.location,
                            "severity": f.severity,
                            "hedged": f.hedged,
                            "size_mm": f.size_mm,
                            "rib": f.rib,
                            "bbox": list(rendered.bboxes[f.kind]),
                        },
                        sort_keys=True,
                    )
                )
            prior = findings
    atomic_write_text(site_dir / "findings.jsonl", "".join(line + "\n" for line in finding_lines))
    return write_manifest(site_dir / "manifest.csv", rows)


def write_federation(
    out_dir: str | Path,
    *,
    num_sites: int,
    studies_per_site: int | Sequence[int],
    image_size: int = 64,
    seed: int = 0,
    dirichlet_alpha: float | None = None,
    test_fraction: float = 0.2,
    difficulty: str = "standard",
) -> list[Path]:
    """Write ``num_sites`` sites under ``out_dir``; ``studies_per_site`` may differ per site."""
    sizes = [int(studies_per_site)] * num_sites if isinstance(studies_per_site, int) else list(studies_per_site)
    if len(sizes) != num_sites:
        raise ValueError(f"studies_per_site lists {len(sizes)} sizes for {num_sites} sites")
    out = Path(out_dir)
    profiles = make_site_profiles(num_sites, seed, dirichlet_alpha)
    return [
        write_site(out, k, profile, sizes[k], image_size, seed, test_fraction, difficulty)
        for k, profile in enumerate(profiles)
    ]
