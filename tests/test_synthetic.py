"""SynthCXR: determinism, spatial truth, labels that match the text, splits, sites, CLI."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlip_fed.cli import data_synth
from mlip_fed.data.manifest_writer import MANIFEST_COLUMNS
from mlip_fed.data.synthetic.findings import FINDING_SPECS, FINDINGS, MASK_CLASS_NAMES, MASK_INDEX, Finding
from mlip_fed.data.synthetic.render import render_study
from mlip_fed.data.synthetic.reports import Statement, aggregate_labels, write_report
from mlip_fed.data.synthetic.sampling import Study, make_site_profiles, new_finding, sample_anatomy
from mlip_fed.data.synthetic.write import generate_federation
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, load_knowledge_base

SITES, STUDIES = 2, 12


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_federation(tmp_path_factory.mktemp("fed"), SITES, STUDIES, image_size=64, seed=3)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_new_sites_leave_old_ones_alone(federation: list[Path], tmp_path: Path) -> None:
    again = generate_federation(tmp_path / "again", SITES, STUDIES, image_size=64, seed=3)
    first, second = _tree(federation[0].parent.parent), _tree(again[0].parent.parent)
    assert first.keys() == second.keys() and len(first) > 4 * SITES
    assert all(first[k] == second[k] for k in first)
    one_site = generate_federation(tmp_path / "one", 1, STUDIES, image_size=64, seed=3)
    assert _tree(one_site[0].parent) == _tree(federation[0].parent)
    other_seed = generate_federation(tmp_path / "other", 1, STUDIES, image_size=64, seed=4)
    assert other_seed[0].read_bytes() != federation[0].read_bytes()


def test_manifest_columns_shapes_and_label_values(federation: list[Path]) -> None:
    for k, manifest in enumerate(federation):
        with manifest.open(encoding="utf-8", newline="") as handle:
            assert tuple(next(csv.reader(handle))) == MANIFEST_COLUMNS
        rows = _rows(manifest)
        assert len(rows) == STUDIES
        for row in rows:
            assert row["site_id"] == f"site_{k}" and row["view"] in ("PA", "AP")
            image = np.asarray(Image.open(manifest.parent / row["image_path"]))
            mask = np.asarray(Image.open(manifest.parent / row["mask_path"]))
            assert image.shape == mask.shape == (64, 64) and image.dtype == mask.dtype == np.uint8
            assert mask.max() <= len(MASK_CLASS_NAMES)
            assert {row[c] for c in CHEXPERT_CATEGORIES} <= {"1.0", "0.0", "-1.0", ""}
            assert "FINDINGS:" in row["report_text"]
            assert ("IMPRESSION:" in row["report_text"]) != ("CONCLUSION:" in row["report_text"])


def test_masks_and_boxes_agree_with_labels(federation: list[Path]) -> None:
    for manifest in federation:
        findings: dict[str, list[dict]] = {}
        for line in (manifest.parent / "findings.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            findings.setdefault(record["study_id"], []).append(record)
        for row in _rows(manifest):
            mask = np.asarray(Image.open(manifest.parent / row["mask_path"]))
            present = findings.get(row["study_id"], [])
            drawn_categories = {c for f in present for c in f["categories"]}
            for f in present:
                x0, y0, x1, y1 = f["bbox"]
                pixels = mask == f["mask_index"]
                assert pixels.any(), f"{row['study_id']}: {f['finding']} has an empty mask"
                ys, xs = np.nonzero(pixels)
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
                primary = f["categories"][0]
                assert row[primary] == ("-1.0" if f["hedged"] else "1.0")
            for category in CHEXPERT_CATEGORIES[1:]:
                if row[category] in ("1.0", "-1.0"):
                    assert category in drawn_categories, f"{row['study_id']}: {category} stated but not drawn"
                if row[category] == "0.0":
                    assert category not in drawn_categories, f"{row['study_id']}: {category} negated but drawn"
            assert set(np.unique(mask)) - {0} == {f["mask_index"] for f in present}


def test_split_is_patient_level(federation: list[Path]) -> None:
    for manifest in federation:
        rows = _rows(manifest)
        by_patient: dict[str, set[str]] = {}
        for row in rows:
            by_patient.setdefault(row["patient_id"], set()).add(row["split"])
        assert all(len(s) == 1 for s in by_patient.values())
        assert {s for splits in by_patient.values() for s in splits} == {"train", "test"}


def test_every_finding_kind_draws_a_mask_at_both_sizes() -> None:
    profile = make_site_profiles(1, 0)[0]
    for size in (64, 224):
        for i, spec in enumerate(FINDING_SPECS):
            rng = np.random.default_rng(i)
            finding = new_finding(spec.kind, rng, hedge_rate=0.5)
            out = render_study(sample_anatomy(rng), (finding,), profile, "PA", size, rng)
            assert out.image.shape == (size, size)
            assert (out.label_mask == MASK_INDEX[spec.kind]).any()
    with pytest.raises(ValueError, match="image_size"):
        render_study(sample_anatomy(rng), (), profile, "PA", 16, rng)


def test_findings_change_pixels_where_the_mask_says() -> None:
    profile = make_site_profiles(1, 0)[0]
    anatomy = sample_anatomy(np.random.default_rng(0))
    finding = Finding("pleural_effusion", "right", "lung_base", "large", False, shape_seed=7)
    clean = render_study(anatomy, (), profile, "PA", 64, np.random.default_rng(1)).image.astype(float)
    sick = render_study(anatomy, (finding,), profile, "PA", 64, np.random.default_rng(1))
    inside = sick.label_mask == MASK_INDEX["pleural_effusion"]
    delta = sick.image.astype(float) - clean
    assert delta[inside].mean() > 10 and abs(delta[~inside].mean()) < 3


def test_aggregation_follows_chexpert() -> None:
    labels = dict(
        zip(
            CHEXPERT_CATEGORIES,
            aggregate_labels(
                [
                    Statement("", (("Pneumonia", "uncertain"), ("Edema", "negative"))),
                    Statement("", (("Edema", "uncertain"), ("Support Devices", "positive"))),
                    Statement("", (("Pneumothorax", "negative"),)),
                ]
            ),
            strict=True,
        )
    )
    assert labels["Pneumonia"] == -1.0 and labels["Edema"] == -1.0 and labels["Pneumothorax"] == 0.0
    assert math.isnan(labels["No Finding"]) and math.isnan(labels["Fracture"])
    only_devices = aggregate_labels([Statement("", (("Support Devices", "positive"),))])
    devices_only = dict(zip(CHEXPERT_CATEGORIES, only_devices, strict=True))
    assert devices_only["No Finding"] == 1.0


@functools.lru_cache(maxsize=1)
def _kb_matcher() -> tuple[re.Pattern[str], dict[str, str]]:
    """One alternation of every KB surface form with a category, longest first (greedy matching)."""
    kb = load_knowledge_base()
    category = {form: c.chexpert_category for c in kb.concepts for form in c.surface_forms if c.chexpert_category}
    alternation = "|".join(re.escape(f) for f in sorted(category, key=lambda f: (-len(f), f)))
    return re.compile(r"(?<![a-z])(?:" + alternation + r")(?![a-z])"), category


def _kb_categories(sentence: str) -> set[str]:
    """Categories whose KB surface forms occur in ``sentence`` (word-bounded, longest match first)."""
    pattern, category = _kb_matcher()
    return {category[m.group(0)] for m in pattern.finditer(sentence.lower())}


def test_every_sentence_mentions_exactly_the_categories_it_labels() -> None:
    profiles = make_site_profiles(4, 11)
    for i in range(60):
        rng = np.random.default_rng(i)
        profile = profiles[i % 4]
        kinds = [s.kind for s in FINDING_SPECS if rng.random() < 0.25]
        kinds = [k for k in kinds if not (k == "consolidation" and "pneumonia" in kinds)]
        kinds = [k for k in kinds if not (k == "nodule" and "mass" in kinds)]
        findings = tuple(new_finding(k, rng, hedge_rate=0.3) for k in kinds)
        study = Study("site_0", "p", "s", i % 2, "AP", findings, has_prior=bool(i % 2), unchanged=bool(i % 3 == 1))
        report = write_report(study, profile.report_style, rng)
        for statement in report.statements:
            assert statement.text in report.text
            assert _kb_categories(statement.text) == {c for c, _ in statement.mentions}, statement


def test_sites_write_differently_and_dirichlet_skews_prevalence() -> None:
    profiles = make_site_profiles(4, 0)
    styles = [p.report_style for p in profiles]
    assert len({(s.impression_header, s.verbose, s.vocabulary_seed, s.sentence_order) for s in styles}) == 4
    assert len({(p.marker_text, p.marker_corner, round(p.gamma, 3)) for p in profiles}) > 1
    finding = Finding("pleural_effusion", "left", "lung_base", "small", False, shape_seed=1)
    study = Study("s", "p", "x", 0, "PA", (finding,))
    texts = {write_report(study, s, np.random.default_rng(0)).text for s in styles}
    assert len(texts) == 4
    assert make_site_profiles(2, 0)[0] == profiles[0]

    def spread(ps: list) -> float:
        return float(np.mean([np.std([p.prevalence[s.kind] / s.base_prevalence for p in ps]) for s in FINDING_SPECS]))

    skewed = make_site_profiles(4, 0, dirichlet_alpha=0.2)
    assert spread(skewed) > 2 * spread(profiles)
    assert [p.prevalence for p in make_site_profiles(4, 0, dirichlet_alpha=100.0)] != [p.prevalence for p in profiles]
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        make_site_profiles(2, 0, dirichlet_alpha=0.0)


def test_follow_ups_share_the_patient() -> None:
    profile = make_site_profiles(1, 0)[0]
    anatomy = sample_anatomy(np.random.default_rng(5))
    finding = Finding("nodule", "right", "right_upper_lobe", "small", False, shape_seed=9, size_mm=20)
    a = render_study(anatomy, (finding,), profile, "PA", 64, np.random.default_rng(1))
    b = render_study(anatomy, (finding,), profile, "PA", 64, np.random.default_rng(2))
    other = render_study(sample_anatomy(np.random.default_rng(6)), (), profile, "PA", 64, np.random.default_rng(2))
    same = np.corrcoef(a.image.ravel(), b.image.ravel())[0, 1]
    different = np.corrcoef(a.image.ravel(), other.image.ravel())[0, 1]
    assert same > different
    assert FINDINGS["nodule"].persistence > 0.5


def test_cli_writes_manifests_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    data_synth.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path), "--sites", "2", "--studies-per-site", "5,3", "--dirichlet-alpha", "1"]
    )
    assert args.func(args) == 0
    assert [len(_rows(tmp_path / f"site_{k}" / "manifest.csv")) for k in range(2)] == [5, 3]
    out = capsys.readouterr().out
    assert "site_0: 5 studies" in out and "Pleural Effusion" in out
    bad = parser.parse_args(["synth", "--out", str(tmp_path), "--sites", "3", "--studies-per-site", "5,3"])
    with pytest.raises(ValueError, match="2 sizes for --sites 3"):
        bad.func(bad)
