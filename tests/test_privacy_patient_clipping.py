"""Decomposable mode with ``privacy_unit: patient`` is charged sensitivity C per patient, so it must clip per patient.

Clipping each record to C lets a patient with k records move the clipped sum by kC. The site's gradient function
(``SitePrivacy.gradient_fn``) must sum a patient's records' gradients and clip that sum.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.config import PrivacyPolicy
from mlip_fed.privacy.site_privacy import SitePrivacy

C = 0.01  # far below every record's gradient norm: every unit is clipped


class PublicNegativesModel(nn.Module):
    """The surface ``PublicNegativesLoss`` uses: linear towers, a public text bank from a knowledge base."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.text_global_head = nn.Linear(3, 4)
        self.kb = SimpleNamespace(concepts=[SimpleNamespace(knowledge_text=f"concept {i}") for i in range(5)])
        self._public = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def embed_public_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_global_head(self._public[: len(texts)])

    def encode_image(self, image: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=F.normalize(self.image(image), dim=1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=F.normalize(self.text(input_ids * attention_mask), dim=1))


def _batch(patients: list[str], heavy_records: int) -> dict:
    g = torch.Generator().manual_seed(2)
    n = len(patients)
    image, text = torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    heavy_image, heavy_text = torch.randn(1, 6, generator=g), torch.randn(1, 5, generator=g)
    if heavy_records:  # one patient, k follow-up studies that look alike: their gradients add up
        image = torch.cat([image, heavy_image.repeat(heavy_records, 1)])
        text = torch.cat([text, heavy_text.repeat(heavy_records, 1)])
        patients = [*patients, *["heavy"] * heavy_records]
    return {
        "image": image,
        "input_ids": text,
        "attention_mask": torch.ones_like(text),
        "patient_id": patients,
    }


def test_a_patient_with_k_records_moves_the_decomposable_clipped_sum_by_at_most_c(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    policy = PrivacyPolicy(
        mechanism="decomposable", privacy_unit="patient", epsilon_budget=8.0, noise_multiplier=1.0, clipping_norm=C
    )
    site = SitePrivacy(policy, tmp_path / "ledger.sqlite", num_records=1000, run_id="r", site="s")
    model = PublicNegativesModel()
    engine = site.gradient_fn(model)
    others = [f"p{i}" for i in range(6)]
    try:
        without, _ = engine.clipped_sum(_batch(others, 0))
        for k in (1, 4):
            with_heavy, _ = engine.clipped_sum(_batch(others, k))
            moved = float(torch.cat([(a - b).flatten() for a, b in zip(with_heavy, without, strict=True)]).norm())
            assert moved <= C * (1 + 1e-4), f"a patient with {k} records moved the clipped sum by {moved / C:.2f} C"
    finally:
        engine.close()
        site.close()


def test_record_unit_still_clips_each_record(tmp_path: Path) -> None:
    """With ``privacy_unit: record`` every record is its own unit (sensitivity C per record): k records move kC."""
    policy = PrivacyPolicy(
        mechanism="decomposable", privacy_unit="record", epsilon_budget=8.0, noise_multiplier=1.0, clipping_norm=C
    )
    site = SitePrivacy(policy, tmp_path / "ledger.sqlite", num_records=1000, run_id="r", site="s")
    model = PublicNegativesModel()
    engine = site.gradient_fn(model)
    try:
        without, _ = engine.clipped_sum(_batch([f"p{i}" for i in range(6)], 0))
        with_heavy, _ = engine.clipped_sum(_batch([f"p{i}" for i in range(6)], 4))
        moved = float(torch.cat([(a - b).flatten() for a, b in zip(with_heavy, without, strict=True)]).norm())
        assert 3.9 * C < moved <= 4 * C * (1 + 1e-4)  # four aligned records, each its own unit
    finally:
        engine.close()
        site.close()
