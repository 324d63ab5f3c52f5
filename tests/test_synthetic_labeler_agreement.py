"""The labeler must recover SynthCXR's ground truth from its reports (macro-F1 >= 0.95 per class)."""

from __future__ import annotations

import csv
import math

from mlip_fed.data.synthetic.write import generate_federation
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.knowledge.labeler import label_report


def _cls(value: float) -> str:
    return "blank" if math.isnan(value) else str(value)


def test_labeler_recovers_generator_labels(tmp_path) -> None:
    manifests = generate_federation(tmp_path, num_sites=3, studies_per_site=60, image_size=32, seed=7)
    truth: list[tuple[float, ...]] = []
    predicted: list[tuple[float, ...]] = []
    for manifest in manifests:
        with manifest.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                truth.append(tuple(float(row[c]) if row[c] else math.nan for c in CHEXPERT_CATEGORIES))
                predicted.append(label_report(row["report_text"]).labels)
    assert len(truth) == 180
    # Macro-F1 over the four CheXpert values {1, 0, -1, blank}, per category (the CheXpert labeler's acceptance measure).
    worst = 1.0
    for j, category in enumerate(CHEXPERT_CATEGORIES):
        classes = {_cls(t[j]) for t in truth} | {_cls(p[j]) for p in predicted}
        f1s = []
        for value in classes:
            tp = sum(_cls(t[j]) == value and _cls(p[j]) == value for t, p in zip(truth, predicted, strict=True))
            fp = sum(_cls(t[j]) != value and _cls(p[j]) == value for t, p in zip(truth, predicted, strict=True))
            fn = sum(_cls(t[j]) == value and _cls(p[j]) != value for t, p in zip(truth, predicted, strict=True))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
        macro = sum(f1s) / len(f1s)
        worst = min(worst, macro)
        assert macro >= 0.95, f"{category}: macro-F1 {macro:.3f} < 0.95"
    assert worst >= 0.95
