"""Write SynthCXR sites to disk in the project's CSV-manifest format (``mlip_fed.data.manifest_writer``).

Per site: ``site_<k>/images/<study>.png`` (8-bit grey), ``site_<k>/masks/<study>.png`` (8-bit label
map: 0 background, k = ``MASK_CLASS_NAMES[k-1]``), ``site_<k>/findings.jsonl`` (one line per finding
with its full-mask bounding box) and ``site_<k>/manifest.csv``. The manifest is written last and
atomically: a site folder without a manifest is an interrupted run, never a half-valid dataset.
Bytes are identical for the same arguments (no timestamps; Pillow's PNG writer is deterministic).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mlip_fed.data.manifest_writer import write_manifest, write_png
from mlip_fed.data.synthetic.findings import FINDINGS, MASK_INDEX, difficulty_tier
from mlip_fed.data.synthetic.render import render_study
from mlip_fed.data.synthetic.reports import write_report
from mlip_fed.data.synthetic.sampling import (
    STREAM_PATIENT,
    STREAM_SPLIT,
    STREAM_STUDY,
    SiteProfile,
    Study,
    assign_splits,
    choose_view,
    make_site_profiles,
    plan_patients,
    same_findings,
    sample_anatomy,
    sample_findings,
    seeded_rng,
)
from mlip_fed.io import atomic_write_text
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, load_knowledge_base


def generate_federation(
    out_dir: str | Path,
    num_sites: int,
    studies_per_site: int | Sequence[int],
    image_size: int = 64,
    seed: int = 0,
    dirichlet_alpha: float | None = None,
    test_fraction: float = 0.2,
    difficulty: str = "standard",
) -> list[Path]:
    """Write one SynthCXR site per folder under ``out_dir``; return the manifests.

    ``studies_per_site`` may differ per site. ``difficulty`` is a tier of ``DIFFICULTY_TIERS`` (``standard``
    or ``cpu``); an unknown name raises ValueError before anything is written.
    """
    difficulty_tier(difficulty)
    sizes = [int(studies_per_site)] * num_sites if isinstance(studies_per_site, int) else list(studies_per_site)
    if len(sizes) != num_sites:
        raise ValueError(f"studies_per_site lists {len(sizes)} sizes for {num_sites} sites")
    out = Path(out_dir)
    profiles = make_site_profiles(num_sites, seed, dirichlet_alpha)
    return [
        write_site(out, k, profile, sizes[k], image_size, seed, test_fraction, difficulty)
        for k, profile in enumerate(profiles)
    ]


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
