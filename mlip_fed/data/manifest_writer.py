"""The project's CSV-manifest format, written: columns, CheXpert label cells, the atomic manifest, 8-bit PNGs.

Knows nothing of how the rows were made: SynthCXR (``mlip_fed.data.synthetic.write``) and the canary runs
(``mlip_fed.privacy.canary_run``) both write through it, so every manifest the readers see has one layout.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_fed.io import atomic_write_text
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

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
