"""Manifest, MIMIC-CXR-JPG and CheXpert readers, and ``mlip-data check``, on tiny fixtures."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlip_fed.cli.data import main
from mlip_fed.data.chexpert import apply_policy, read_chexpert
from mlip_fed.data.manifest import read_manifest
from mlip_fed.data.mimic import findings_impression, read_mimic
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

IDX = {name: i for i, name in enumerate(CHEXPERT_CATEGORIES)}


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)).save(path)
    return path


def _jpg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), 120, np.uint8)).save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------- manifest


def test_manifest_loads_paths_reports_and_labels(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    _png(tmp_path / "img" / "a_mask.png")
    (tmp_path / "b.txt").write_text("FINDINGS: Small left effusion.", encoding="utf-8")
    header = ["image_path", "report_text", "report_path", "patient_id", "study_id", "split", "view", "site_id",
              "mask_path", "Pleural Effusion", "Cardiomegaly"]  # fmt: skip
    manifest = _write_csv(
        tmp_path / "site.csv",
        header,
        [
            ["img/a.png", "No acute process.", "", "P1", "S1", "train", "PA", "h1", "img/a_mask.png", "0.0", ""],
            [str(absolute), "", "b.txt", "P2", "S2", "validate", "AP", "h1", "", "1", "-1.0"],
        ],
    )
    records, report = read_manifest(manifest)
    assert report.loaded == 2 and report.total_skipped == 0
    a, b = records
    assert a.image_path == tmp_path / "img" / "a.png" and a.mask_path == tmp_path / "img" / "a_mask.png"
    assert a.report == "No acute process." and (a.view, a.site_id, a.split) == ("PA", "h1", "train")
    assert b.image_path == absolute and b.report == "FINDINGS: Small left effusion." and b.split == "val"
    assert a.labels[IDX["Pleural Effusion"]] == 0.0 and math.isnan(a.labels[IDX["Cardiomegaly"]])
    assert b.labels[IDX["Pleural Effusion"]] == 1.0 and b.labels[IDX["Cardiomegaly"]] == -1.0
    assert math.isnan(b.labels[IDX["Edema"]])  # absent label column → not mentioned
    only_val, filtered = read_manifest(manifest, splits=["val"])
    assert [r.study_id for r in only_val] == ["S2"]
    assert filtered.skipped == {"filtered: split not in ['val']": 1}


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (["image_path", "report_text", "study_id"], "missing required column(s) ['patient_id']"),
        (["image_path", "patient_id", "study_id"], "needs one of ['report_text', 'report_path']"),
        (["image_path", "report_text", "patient_id", "study_id", "Pleural Efusion"], "unknown column(s)"),
    ],
)
def test_manifest_bad_columns_fail_at_load(tmp_path: Path, header: list[str], problem: str) -> None:
    manifest = _write_csv(tmp_path / "bad.csv", header, [])
    with pytest.raises(ValueError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert str(manifest) in message and problem in message
    assert "Expected required ['image_path', 'patient_id', 'study_id']" in message
    assert f"found {header}" in message


def test_manifest_bad_rows_are_skipped_per_reason(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    (tmp_path / "latin1.txt").write_bytes("Épanchement pleural gauche".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("   \n", encoding="utf-8")
    manifest = _write_csv(
        tmp_path / "site.csv",
        ["image_path", "report_text", "report_path", "patient_id", "study_id", "Edema"],
        [
            ["ok.png", "Normal.", "", "P1", "S1", "1.0"],
            ["gone.png", "Normal.", "", "P2", "S2", ""],
            ["ok.png", "", "latin1.txt", "P3", "S3", ""],
            ["ok.png", "", "blank.txt", "P4", "S4", ""],
            ["ok.png", "", "missing.txt", "P5", "S5", ""],
            ["ok.png", "Normal.", "", "", "S6", ""],
            ["ok.png", "Normal.", "", "P7", "S7", "yes"],
            ["ok.png", "Normal.", "", "P8", "S8", ""],  # same image as row 1
        ],
    )
    records, report = read_manifest(manifest)
    assert [r.study_id for r in records] == ["S1"]
    assert report.loaded == 1
    assert report.skipped == {
        "image file not found": 1,
        "report not UTF-8": 1,
        "empty report": 1,
        "report file not found": 1,
        "missing patient_id": 1,
        "bad label value": 1,
        "duplicate image_path": 1,
    }
    assert report.examples["bad label value"] == [
        "site.csv:8 column 'Edema': label 'yes' is not one of 1, 0, -1 or blank"
    ]
    assert report.examples["image file not found"][0].startswith("site.csv:3: ")


def test_manifest_not_utf8_fails_with_file_name(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("image_path,report_text,patient_id,study_id\nä.png,x,1,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="m.csv: not UTF-8"):
        read_manifest(path)


# --------------------------------------------------------------------------------------------- MIMIC


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough, r/o pneumonia

 FINDINGS:
 There is a small left
 pleural effusion.

 IMPRESSION:
 Small left effusion.
"""


def _mimic_tree(tmp_path: Path) -> tuple[Path, Path]:
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    studies = [  # dicom, subject, study, view, split, has image
        ("d1", "10000032", "50000001", "PA", "train", True),
        ("d2", "10000032", "50000001", "LATERAL", "train", True),
        ("d3", "10000032", "50000002", "AP", "validate", True),
        ("d4", "11000011", "50000003", "AP", "test", False),
        ("d5", "11000011", "50000004", "PA", "train", True),  # report missing
        ("d6", "12000012", "50000005", "PA", "train", True),  # no split entry
    ]
    meta_rows, split_rows = [], []
    for dicom, subject, study, view, split, has_image in studies:
        meta_rows.append([dicom, subject, study, "CHEST", view, "24", "24"])
        if dicom != "d6":
            split_rows.append([dicom, study, subject, split])
        if has_image:
            _jpg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    with gzip.open(meta, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                         "Rows", "Columns"])  # fmt: skip
        writer.writerows(meta_rows)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    label_rows = [["10000032", "50000001", *([""] * 14)], ["10000032", "50000002", *([""] * 14)]]
    label_rows[0][2 + IDX["Pleural Effusion"]] = "1.0"
    label_rows[1][2 + IDX["Edema"]] = "-1.0"
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_CATEGORIES], label_rows)
    for subject, study, text in (
        ("10000032", "50000001", MIMIC_REPORT),
        ("10000032", "50000002", " FINDINGS: Lungs are clear.\n"),
        ("11000011", "50000003", " IMPRESSION: No acute process.\n"),
        ("12000012", "50000005", " IMPRESSION: No acute process.\n"),
    ):
        path = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root, reports


def test_findings_impression_keeps_only_those_sections() -> None:
    text = findings_impression(MIMIC_REPORT)
    assert text == "FINDINGS: There is a small left pleural effusion.\nIMPRESSION: Small left effusion."
    assert findings_impression("Comparison none.\n\nHeart size normal. No effusion.") == (
        "Heart size normal. No effusion."
    )


def test_read_mimic_joins_views_splits_labels_and_reports(tmp_path: Path) -> None:
    root, reports = _mimic_tree(tmp_path)
    records, report = read_mimic(root, reports_root=reports)
    assert [(r.image_path.name, r.split, r.view) for r in records] == [
        ("d1.jpg", "train", "PA"),
        ("d3.jpg", "val", "AP"),
    ]
    d1, d3 = records
    assert (d1.patient_id, d1.study_id) == ("10000032", "50000001")
    assert d1.report == "FINDINGS: There is a small left pleural effusion.\nIMPRESSION: Small left effusion."
    assert d1.labels[IDX["Pleural Effusion"]] == 1.0 and math.isnan(d1.labels[IDX["Edema"]])
    assert d3.labels[IDX["Edema"]] == -1.0
    assert report.loaded == 2
    assert report.skipped == {
        "filtered: view not in ['AP', 'PA']": 1,
        "image file not found": 1,
        "report file not found": 1,
        "no split entry": 1,
    }
    train_only, _ = read_mimic(root, reports_root=reports, splits=["train"], views=None)
    assert [r.image_path.name for r in train_only] == ["d1.jpg", "d2.jpg"]


def test_read_mimic_missing_csv_is_an_error(tmp_path: Path) -> None:
    root, reports = _mimic_tree(tmp_path)
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        read_mimic(root, reports_root=reports)


# --------------------------------------------------------------------------------------------- CheXpert


def _chexpert(tmp_path: Path) -> Path:
    base = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for patient, study, view, frontal, appa, exists in (
        ("patient00001", "study1", "view1_frontal", "Frontal", "AP", True),
        ("patient00001", "study1", "view2_lateral", "Lateral", "", True),
        ("patient00002", "study1", "view1_frontal", "Frontal", "PA", False),
    ):
        rel = f"CheXpert-v1.0-small/train/{patient}/{study}/{view}.jpg"
        if exists:
            _jpg(tmp_path / rel)
        labels = [""] * 14
        labels[IDX["Atelectasis"]] = "-1.0"
        labels[IDX["Cardiomegaly"]] = "-1.0"
        labels[IDX["Support Devices"]] = "1.0"
        rows.append([rel, "Female", "68", frontal, appa, *labels])
    return _write_csv(base.parent / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
                                                  *CHEXPERT_CATEGORIES], rows)  # fmt: skip


def test_read_chexpert_policies_and_paths(tmp_path: Path) -> None:
    csv_path = _chexpert(tmp_path)
    records, report = read_chexpert(csv_path, tmp_path, policy="mgca")
    (record,) = records
    assert record.report == "" and record.patient_id == "patient00001" and record.study_id == "patient00001/study1"
    assert record.view == "AP" and record.split == "train"
    assert record.labels[IDX["Atelectasis"]] == 1.0 and record.labels[IDX["Cardiomegaly"]] == 0.0
    assert record.labels[IDX["Support Devices"]] == 1.0 and math.isnan(record.labels[IDX["Edema"]])
    assert report.skipped == {"filtered: lateral view": 1, "image file not found": 1}
    # image_root may also be the CheXpert-v1.0-small folder itself
    same, _ = read_chexpert(csv_path, tmp_path / "CheXpert-v1.0-small", policy="keep", frontal_only=False)
    assert [r.view for r in same] == ["AP", "LATERAL"]
    assert same[0].labels[IDX["Atelectasis"]] == -1.0


def test_uncertainty_policies_and_refusals(tmp_path: Path) -> None:
    labels = tuple(-1.0 if i % 2 else math.nan for i in range(14))
    assert set(apply_policy(labels, "u_ones")[1::2]) == {1.0}
    assert set(apply_policy(labels, "u_zeros")[1::2]) == {0.0}
    assert all(math.isnan(v) for v in apply_policy(labels, "u_ones")[::2])
    assert set(apply_policy(labels, "u_ones", blank_as_negative=True)[::2]) == {0.0}
    with pytest.raises(ValueError, match="unknown uncertainty policy"):
        apply_policy(labels, "u_maybe")  # type: ignore[arg-type]
    csv_path = _chexpert(tmp_path)
    with pytest.raises(ValueError, match="no report text"):
        read_chexpert(csv_path, tmp_path, require_report=True)


# --------------------------------------------------------------------------------------------- mlip-data check


@pytest.fixture
def check_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch only ``check``: these tests must not depend on the other subcommands importing."""
    monkeypatch.setattr("mlip_fed.cli.data.SUBCOMMANDS", ("check",))


@pytest.mark.usefixtures("check_only")
def test_check_reports_loaded_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "ok.png")
    _png(tmp_path / "cut.png", seed=3)
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:120])
    manifest = _write_csv(
        tmp_path / "site.csv",
        ["image_path", "report_text", "patient_id", "study_id"],
        [["ok.png", "Normal.", "P1", "S1"], ["cut.png", "Normal.", "P2", "S2"], ["gone.png", "Normal.", "P3", "S3"]],
    )
    assert main(["check", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "loaded: 1" in out and "skipped: 2" in out
    assert "image decode failed: truncated or corrupt: 1" in out and "cut.png" in out
    assert "image file not found: 1" in out and "total loaded: 1" in out

    empty = _write_csv(tmp_path / "none.csv", ["image_path", "report_text", "patient_id", "study_id"],
                       [["gone.png", "Normal.", "P3", "S3"]])  # fmt: skip
    assert main(["check", "--manifest", str(empty)]) == 1
    assert "total loaded: 0" in capsys.readouterr().out


@pytest.mark.usefixtures("check_only")
def test_check_mimic_and_chexpert_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, reports = _mimic_tree(tmp_path / "m")
    csv_path = _chexpert(tmp_path / "c")
    argv = ["check", "--mimic-root", str(root), "--mimic-reports", str(reports)]
    assert main([*argv, "--chexpert-csv", str(csv_path), "--chexpert-root", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "== MIMIC-CXR-JPG" in out and "2 images, 1 patients (train=1, val=1)" in out
    assert "== CheXpert" in out and "total loaded: 3" in out
    bad = _write_csv(tmp_path / "bad.csv", ["image_path", "patient_id"], [])
    assert main(["check", "--manifest", str(bad)]) == 2
    assert "missing required column(s) ['study_id']" in capsys.readouterr().err
