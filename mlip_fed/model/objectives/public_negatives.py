"""Decomposable global contrast for DP (docs/privacy.md "Decomposable mode"): negatives from public text only.

The objective ``privacy.mode=decomposable`` trains with (``mlip_fed.privacy.engine.BucketedClippingGradient``): the
model's ``embed_public_texts`` gives the negative bank, so this module needs no model internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


class PublicNegativesLoss:
    """Decomposable global contrast: record k's InfoNCE uses its own pair and negatives from a public bank.

    The negatives are embeddings of public text (by default the knowledge base's category descriptions and
    concept definitions) computed under ``no_grad`` by the current text tower, so record k's loss term depends
    on record k only and per-record clipping bounds its influence by C (docs/privacy.md "Decomposable mode").
    Only image->text and text->public-text directions are used (there are no public images).
    """

    def __init__(self, model: Any, public_texts: Sequence[str] | None = None, temperature: float = 0.07) -> None:
        if public_texts is None:
            kb = getattr(model, "kb", None)
            if kb is None:
                raise ValueError("PublicNegativesLoss: give public_texts (the model has no knowledge base)")
            public_texts = [c.knowledge_text for c in kb.concepts]
        if not public_texts:
            raise ValueError("PublicNegativesLoss: the public negative bank is empty")
        self.public_texts = list(public_texts)
        self.temperature = temperature

    def __call__(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bank = model.embed_public_texts(self.public_texts)
        image = model.encode_image(batch["image"]).embedding
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).embedding
        positive = (image * text).sum(dim=1, keepdim=True) / self.temperature  # [B, 1]
        negatives = image @ bank.t() / self.temperature  # [B, P]
        logits = torch.cat([positive, negatives], dim=1)
        loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        return loss, {"public_itc": loss}
