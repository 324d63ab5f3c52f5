"""The prototype release is accounted as z = sigma / sqrt(3 L): one privacy unit may move each of the three released
statistics (image sums, text sums, counts) by at most sqrt(L) in L2. A patient with many follow-up studies positive
for one category must therefore move that category's row by at most 1 and its count by at most 1, not by k.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.federation.site import accumulate_bank
from mlip_fed.model.objectives.prototype_bank import PrototypeBank

K, D = 14, 8


class Embedder(nn.Module):
    """The surface ``accumulate_bank`` uses: image/text encoders with unit-norm embeddings and a prototype bank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, D)
        self.text = nn.Linear(5, D)
        self.prototype_bank = PrototypeBank(dim=D)

    def encode_image(self, image: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=F.normalize(self.image(image), dim=1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=F.normalize(self.text(input_ids * attention_mask), dim=1))


def _records(with_heavy: bool) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(10):  # ten ordinary patients, one study each, one or two positive categories
        labels = torch.zeros(K)
        labels[i % K] = 1.0
        labels[(3 * i + 1) % K] = 1.0
        out.append(
            {
                "image": torch.randn(6, generator=g),
                "text": torch.randn(5, generator=g),
                "labels": labels,
                "patient_id": f"p{i}",
                "study_id": f"s{i}",
            }
        )
    if with_heavy:  # 9 follow-up studies, all positive for category 2 (and one of them also for category 5)
        for j in range(9):
            labels = torch.zeros(K)
            labels[2] = 1.0
            if j == 0:
                labels[5] = 1.0
            out.append(
                {
                    "image": torch.randn(6, generator=g),
                    "text": torch.randn(5, generator=g),
                    "labels": labels,
                    "patient_id": "heavy",
                    "study_id": f"h{j}",
                }
            )
    return out


def _loader(records: list[dict], batch_size: int = 4) -> list[dict]:
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        text = torch.stack([r["text"] for r in chunk])
        batches.append(
            {
                "image": torch.stack([r["image"] for r in chunk]),
                "input_ids": text,
                "attention_mask": torch.ones_like(text),
                "labels": torch.stack([r["labels"] for r in chunk]),
                "patient_id": [r["patient_id"] for r in chunk],
                "study_id": [r["study_id"] for r in chunk],
            }
        )
    return batches


def test_a_patient_with_many_studies_moves_each_released_row_and_count_by_at_most_one() -> None:
    model = Embedder()
    with_bank, contributions = accumulate_bank(model, _loader(_records(True)), torch.device("cpu"), "patient_id")
    without_bank, _ = accumulate_bank(model, _loader(_records(False)), torch.device("cpu"), "patient_id")
    d_count = with_bank.count - without_bank.count
    d_image = (with_bank.sum_image - without_bank.sum_image).norm(dim=1)
    d_text = (with_bank.sum_text - without_bank.sum_text).norm(dim=1)
    assert float(d_count.abs().max()) <= 1.0 + 1e-6, d_count  # 9 studies positive for category 2: still 1
    assert float(d_image.max()) <= 1.0 + 1e-5 and float(d_text.max()) <= 1.0 + 1e-5
    # the accounted L2 sensitivity: sqrt(L) per statistic with L = the unit's distinct positive categories
    assert contributions == 2  # the bound the release is checked against: categories 2 and 5
    total_sq = float(d_count.pow(2).sum() + d_image.pow(2).sum() + d_text.pow(2).sum())
    assert total_sq <= 3 * contributions * (1 + 1e-5)


def test_record_unit_counts_each_study() -> None:
    """With ``privacy_unit: record`` (unit key study_id) every study is its own unit and contributes 1 per category."""
    model = Embedder()
    bank, contributions = accumulate_bank(model, _loader(_records(True)), torch.device("cpu"), "study_id")
    assert float(bank.count[2]) == 9 + sum(1 for i in range(10) if 2 in (i % K, (3 * i + 1) % K))
    assert contributions == 2
