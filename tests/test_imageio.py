"""Image decoding (PNG/JPEG/DICOM), the MONAI transforms and the corruption-tolerant dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mlip_fed.data.dataset import (
    ImageReportDataset,
    collate_skipping_none,
    seed_worker,
    validate_records,
    with_masks,
)
from mlip_fed.data.imageio import ImageDecodeError, read_image
from mlip_fed.data.records import StudyRecord
from mlip_fed.data.transforms import build_transforms, build_view_pair

torch.set_num_threads(1)


def _gradient(height: int = 32, width: int = 48, top: int = 255, dtype=np.uint8) -> np.ndarray:
    row = np.linspace(0, top, width).round().astype(dtype)
    return np.tile(row, (height, 1))


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------- PNG / JPEG


def test_png_8bit_is_scaled_by_255(tmp_path: Path) -> None:
    pixels = _gradient()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


def test_png_16bit_is_scaled_by_65535(tmp_path: Path) -> None:
    pixels = _gradient(top=65535, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(out, pixels / 65535.0, atol=1e-6)
    assert out.max() == pytest.approx(1.0)


def test_rgb_jpeg_rgba_and_palette_become_grey(tmp_path: Path) -> None:
    grey = _gradient()
    rgb = np.stack([grey, grey, grey], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)])).save(tmp_path / "b.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "c.png")
    for name in ("a.jpg", "b.png", "c.png"):
        out = read_image(tmp_path / name)
        assert out.shape == grey.shape, name
        assert 0.0 <= out.min() and out.max() <= 1.0
        np.testing.assert_allclose(out, grey / 255.0, atol=0.05, err_msg=name)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "unknown image format"),
        (lambda p: Image.fromarray(np.zeros((4, 4), np.uint8)).save(p, format="PNG"), "too small"),
        (lambda p: Image.fromarray(np.zeros((1, 64), np.uint8)).save(p, format="PNG"), "too small"),
    ],
)
def test_bad_images_raise_typed_error(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageDecodeError) as info:
        read_image(path)
    assert info.value.reason == reason
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_truncated_png_and_missing_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as info:
        read_image(tmp_path / "cut.png")
    assert info.value.reason == "truncated or corrupt"
    with pytest.raises(ImageDecodeError) as info:
        read_image(tmp_path / "nope.png")
    assert info.value.reason == "file not found"


# --------------------------------------------------------------------------------------------- DICOM


def test_dicom_monochrome1_rescale_then_window_then_invert(tmp_path: Path) -> None:
    # Raw 0..4095 with slope 1 / intercept -1024 → modality values -1024..3071. A window at 0 ± 100
    # in modality units only has its ramp around raw 1024: that proves the rescale came first.
    raw = _gradient(16, 4096, top=4095, dtype=np.uint16)
    path = _write_dicom(
        tmp_path / "x.dcm", raw, photometric="MONOCHROME1", slope=1.0, intercept=-1024.0, window=(0.0, 200.0)
    )
    out = read_image(path)
    assert out.shape == raw.shape and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0] == pytest.approx(1.0)  # low raw value is bright after MONOCHROME1 inversion
    assert out[0, 4095] == pytest.approx(0.0)
    assert out[0, 1024] == pytest.approx(0.5, abs=0.02)
    assert out[0, 900] == pytest.approx(1.0) and out[0, 1150] == pytest.approx(0.0)


def test_dicom_percentile_clip_ignores_outliers_and_magic_detection(tmp_path: Path) -> None:
    raw = _gradient(40, 50, top=2000, dtype=np.uint16)
    raw[0, 0] = 4095  # one burnt-in marker pixel must not squash the rest of the range
    path = _write_dicom(tmp_path / "image_without_suffix", raw)
    out = read_image(path)
    assert out[0, 0] == 1.0
    assert np.median(out) == pytest.approx(0.5, abs=0.05)
    assert out[5, -1] == pytest.approx(1.0, abs=0.01)  # the real maximum reaches the top, not ~0.5


def test_truncated_and_flat_dicom(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "x.dcm", _gradient(32, 32, top=1000, dtype=np.uint16))
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 500])
    with pytest.raises(ImageDecodeError):
        read_image(tmp_path / "cut.dcm")
    flat = _write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 7, np.uint16))
    with pytest.raises(ImageDecodeError) as info:
        read_image(flat)
    assert info.value.reason == "no contrast"


# --------------------------------------------------------------------------------------------- transforms


def test_eval_transform_keeps_whole_image_and_normalises() -> None:
    tall = np.ones((80, 40), np.float32)  # a white tall image: padding must appear left and right
    out = build_transforms(32, train=False)(tall)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert out[0, :, 0].max() == -1.0 and out[0, :, -1].max() == -1.0  # pad (0) normalised to -1
    assert out[0, :, 12:20].min() == pytest.approx(1.0)  # content (1) normalised to +1
    again = build_transforms(32, train=False, seed=5)(tall)
    assert torch.equal(out, again)


def test_train_transform_is_seeded_and_never_flips() -> None:
    image = np.zeros((48, 48), np.float32)
    image[:, :24] = 1.0  # bright left half
    first = [build_transforms(32, train=True, seed=s)(image) for s in range(12)]
    repeat = build_transforms(32, train=True, seed=3)(image)
    assert torch.equal(first[3], repeat)
    assert not torch.equal(first[3], first[4])
    for out in first:
        assert out.shape == (1, 32, 32)
        assert out[0, :, :16].mean() > out[0, :, 16:].mean()  # left stays left: no horizontal flip
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_view_pair_gives_different_views() -> None:
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    view1, view2 = build_view_pair(32, seed=0)
    assert not torch.equal(view1(image), view2(image))


# --------------------------------------------------------------------------------------------- dataset


def _record(path: Path, study: str, labels=None) -> StudyRecord:
    labels = labels or tuple(math.nan for _ in range(14))
    return StudyRecord(image_path=path, report=f"report {study}", patient_id=f"p{study}", study_id=study, labels=labels)


def test_dataset_skips_corrupt_image_mid_epoch(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "good.png")
    noise = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "bad.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "bad.png").read_bytes()[:300])  # truncated copy
    labels = (1.0, 0.0, -1.0, *([math.nan] * 11))
    records = [_record(tmp_path / "good.png", "s1", labels), _record(tmp_path / "bad.png", "s2")]
    eval_t = build_transforms(32, train=False)
    view1, view2 = build_view_pair(32, seed=1)
    dataset = ImageReportDataset(records, view1, second_view_transform=view2)
    item = dataset[0]
    assert set(item) == {"image", "image_view2", "report", "labels", "patient_id", "study_id", "index"}
    assert item["image"].shape == item["image_view2"].shape == (1, 32, 32)
    assert item["labels"][:3].tolist() == [1.0, 0.0, -1.0] and torch.isnan(item["labels"][3:]).all()
    assert dataset[1] is None and dataset[1] is None  # counted once however often it is asked for
    assert dataset.skips.total_skipped == 1 and dataset.skips.loaded == 1
    assert list(dataset.skips.skipped) == ["image decode failed: truncated or corrupt"]

    loader = DataLoader(
        ImageReportDataset(records, eval_t), batch_size=2, collate_fn=collate_skipping_none, worker_init_fn=seed_worker
    )
    (batch,) = list(loader)
    assert batch["image"].shape == (1, 1, 32, 32)
    assert batch["report"] == ["report s1"] and batch["study_id"] == ["s1"]
    assert batch["index"].tolist() == [0] and batch["labels"].shape == (1, 14)
    assert collate_skipping_none([None, None]) is None


def test_validate_records_counts_per_reason(tmp_path: Path) -> None:
    Image.fromarray(_gradient()).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tiny.png")
    records = [_record(tmp_path / n, n) for n in ("good.png", "empty.png", "tiny.png")]
    ok, report = validate_records(records)
    assert [r.study_id for r in ok] == ["good.png"]
    assert report.loaded == 1
    assert report.skipped == {"image decode failed: empty file": 1, "image decode failed: too small": 1}


def test_with_masks_aligns_labels_with_eval_geometry(tmp_path: Path) -> None:
    image = np.zeros((40, 20), np.uint8)
    image[:20] = 255  # bright top half of a tall image
    labels = np.zeros((40, 20), np.uint8)
    labels[:20] = 3  # class 3 exactly where the image is bright
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(labels).save(tmp_path / "mask.png")
    record = StudyRecord(tmp_path / "img.png", "r", "p", "s", mask_path=tmp_path / "mask.png")
    masked = with_masks(ImageReportDataset([record], build_transforms(16, train=False)), 16)
    item = masked[0]
    assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.long
    assert set(item["mask"].unique().tolist()) == {0, 3}  # labels stay labels, never scaled
    assert torch.equal(item["mask"] == 3, item["image"][0] > 0.5)
    with pytest.raises(ValueError, match="deterministic eval transform"):
        with_masks(ImageReportDataset([record], build_transforms(16, train=True)), 16)
    with pytest.raises(ValueError, match="no mask_path"):
        with_masks(ImageReportDataset([_record(tmp_path / "img.png", "s2")], build_transforms(16, train=False)), 16)
    (tmp_path / "mask.png").write_bytes(b"")
    masked = with_masks(ImageReportDataset([record], build_transforms(16, train=False)), 16)
    assert masked[0] is None and masked.skips.skipped == {"mask decode failed: empty file": 1}
