"""Decode one chest X-ray file into a float32 [H, W] array in [0, 1].

Every reader, the dataset and ``mlip-data check`` go through :func:`read_image`, so a site's PNG
export, a public JPG and a raw DICOM from the PACS all reach the transforms in the same form: grey,
bright bone, unit range. Anything that cannot be turned into that raises :class:`ImageDecodeError`
with a short, countable ``reason`` so callers can skip the study and say why instead of crashing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Smallest side we accept; anything smaller is a thumbnail or a broken export, not a radiograph.
MIN_SIDE = 8
#: Percentiles that bound a DICOM's intensity range (outliers: burnt-in text, collimator edges).
DICOM_PERCENTILES = (0.5, 99.5)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})


class ImageDecodeError(Exception):
    """An image that cannot become a 2-D grey array.

    ``reason`` is a short fixed phrase ("truncated or corrupt", "too small", ...) that skip reports
    count; ``detail`` carries the specifics (decoder message, shape) for the examples.
    """

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        message = f"{self.path}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)


def is_dicom(path: str | Path) -> bool:
    """DICOM by suffix or by the ``DICM`` magic at byte 128 (PACS exports often have no suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> np.ndarray:
    """Read PNG/JPEG/DICOM (and anything else Pillow decodes) as float32 [H, W] in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageDecodeError(path, "empty file")
    array = _read_dicom(path) if is_dicom(path) else _read_pillow(path)
    return _check_shape(path, array)


def _check_shape(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim != 2:
        raise ImageDecodeError(path, "not a 2-D image", f"shape {tuple(array.shape)}")
    if min(array.shape) < MIN_SIDE:
        raise ImageDecodeError(path, "too small", f"shape {tuple(array.shape)}, need >= {MIN_SIDE} px per side")
    if not np.isfinite(array).all():
        raise ImageDecodeError(path, "non-finite pixels")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_label_mask(path: str | Path) -> np.ndarray:
    """Read an integer label mask (0 = background, k = class k) as int64 [H, W], values untouched.

    Masks must not go through :func:`read_image`: scaling by 255 would turn class 3 into 0.0118.
    Palette PNGs keep their indices; colour masks are refused because a colour is not a class.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageDecodeError(path, "empty file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"):
                raise ImageDecodeError(
                    path, "not a label mask", f"mode {image.mode}; expected 8/16-bit grey or palette"
                )
            labels = np.asarray(image).astype(np.int64)
    except UnidentifiedImageError as err:
        raise ImageDecodeError(path, "unknown image format", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(path, "truncated or corrupt", str(err)) from err
    if labels.ndim != 2:
        raise ImageDecodeError(path, "not a 2-D image", f"shape {tuple(labels.shape)}")
    if labels.min() < 0:
        raise ImageDecodeError(path, "not a label mask", f"negative value {labels.min()}")
    return labels


# ----------------------------------------------------------------------------------------------- Pillow


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncation surfaces here, not inside a worker later
            return _pillow_to_unit(path, image)
    except UnidentifiedImageError as err:
        raise ImageDecodeError(path, "unknown image format", str(err)) from err
    except Image.DecompressionBombError as err:  # Pillow's guard stays on; a radiograph is far below it
        raise ImageDecodeError(path, "image too large", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(path, "truncated or corrupt", str(err)) from err


def _pillow_to_unit(path: Path, image: Image.Image) -> np.ndarray:
    """Grey in [0, 1], scaled by the container's bit depth (8-bit / 255, 16-bit / 65535).

    Bit-depth scaling, not min-max, keeps the intensity curve the site exported; the transforms
    normalise afterwards. Colour and palette images go through Pillow's ITU-R 601 luma.
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":
        # 32-bit signed container: Pillow uses it for 16-bit greyscale from some encoders.
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageDecodeError(
                path, "unsupported pixel range", f"32-bit integers in [{values.min()}, {values.max()}], not 16-bit"
            )
        return values.astype(np.float32) / 65535.0
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0:
            return values
        raise ImageDecodeError(path, "unsupported pixel range", "32-bit float pixels outside [0, 1]")
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    grey = image if mode == "L" else image.convert("L")
    return np.asarray(grey, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise ImageDecodeError(path, "truncated or corrupt", f"DICOM header: {err}") from err
    if "PixelData" not in dataset:
        raise ImageDecodeError(path, "DICOM without pixel data")
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(path, "not a 2-D image", f"multi-frame DICOM with {frames} frames")
    try:
        pixels = dataset.pixel_array
    except Exception as err:  # pydicom raises many types here (missing codec, bad length)
        raise ImageDecodeError(path, "undecodable DICOM pixels", f"{type(err).__name__}: {err}") from err

    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        from pydicom.pixels import convert_color_space

        if photometric != "RGB":
            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return _unit_range(path, pixels)
    if pixels.ndim != 2:
        raise ImageDecodeError(path, "not a 2-D image", f"DICOM pixel array shape {tuple(pixels.shape)}")

    try:
        values = apply_modality_lut(pixels, dataset).astype(np.float64)
        if "VOILUTSequence" in dataset or ("WindowCenter" in dataset and "WindowWidth" in dataset):
            values = np.asarray(apply_voi_lut(values, dataset, index=0), dtype=np.float64)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as err:
        raise ImageDecodeError(path, "bad DICOM LUT", f"{type(err).__name__}: {err}") from err
    if photometric == "MONOCHROME1":
        values = values.max() - values  # high values are dark in MONOCHROME1; make bone bright
    return _unit_range(path, values)


def _unit_range(path: Path, values: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles and scale to [0, 1]; a flat image has no usable content."""
    low, high = np.percentile(values, DICOM_PERCENTILES)
    if not high > low:
        raise ImageDecodeError(path, "no contrast", f"percentile range [{low}, {high}] is empty")
    return ((np.clip(values, low, high) - low) / (high - low)).astype(np.float32)
