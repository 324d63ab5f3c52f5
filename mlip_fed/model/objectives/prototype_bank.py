"""Per-category prototype statistics that a site releases and the server merges.

A site accumulates, for every CheXpert category, the sum of unit-norm image and text embeddings of
its studies labelled positive for it, and how many there were. Only these sums and counts leave a
site (DP-noised by the privacy layer under a DP policy). The server's bank pools them as
count-weighted means; a category seen fewer than ``min_count`` times keeps its previous value, so a
site with two pneumothorax cases cannot move the shared pneumothorax prototype on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

_KEYS = ("prototypes_image", "prototypes_text", "initialized", "sum_image", "sum_text", "count")


class PrototypeBank:
    """Category centroids (image and text) plus the current accumulation window's sums and counts."""

    def __init__(self, dim: int = 128, categories: Sequence[str] = CHEXPERT_CATEGORIES, min_count: float = 5.0) -> None:
        self.categories = tuple(categories)
        self.dim = dim
        self.min_count = float(min_count)
        k = len(self.categories)
        self.prototypes_image = torch.zeros(k, dim)
        self.prototypes_text = torch.zeros(k, dim)
        #: Which categories have ever received a merged value.
        self.initialized = torch.zeros(k, dtype=torch.bool)
        self.sum_image = torch.zeros(k, dim)
        self.sum_text = torch.zeros(k, dim)
        self.count = torch.zeros(k)

    @torch.no_grad()
    def accumulate(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch. ``labels`` [B, K] in CheXpert coding: only 1.0 counts (NaN, 0, -1 do not)."""
        k = len(self.categories)
        if labels.ndim != 2 or labels.shape[1] != k:
            raise ValueError(f"PrototypeBank.accumulate: labels must be [B, {k}], got {tuple(labels.shape)}")
        if image.shape != (labels.shape[0], self.dim) or text.shape != image.shape:
            raise ValueError(
                f"PrototypeBank.accumulate: embeddings must be [{labels.shape[0]}, {self.dim}], "
                f"got image {tuple(image.shape)} text {tuple(text.shape)}"
            )
        positive = (labels == 1.0).float().cpu()  # NaN == 1 is False
        self.sum_image += positive.t() @ F.normalize(image.detach().float().cpu(), dim=1)
        self.sum_text += positive.t() @ F.normalize(text.detach().float().cpu(), dim=1)
        self.count += positive.sum(dim=0)

    def reset_statistics(self) -> None:
        self.sum_image.zero_()
        self.sum_text.zero_()
        self.count.zero_()

    @torch.no_grad()
    def merge(self, other_banks: Sequence[PrototypeBank], renormalize: bool = True) -> torch.Tensor:
        """Set this bank's prototypes to the count-weighted means of the others' statistics.

        Only ``other_banks``' sums and counts are pooled (this bank's own window is not). Categories whose
        pooled count is below ``min_count`` keep their previous value. Returns the [K] mask of updated rows.
        """
        for other in other_banks:
            if other.categories != self.categories or other.dim != self.dim:
                raise ValueError("PrototypeBank.merge: banks disagree on categories or embedding dimension")
        if not other_banks:
            return torch.zeros(len(self.categories), dtype=torch.bool)
        total = torch.stack([o.count for o in other_banks]).sum(dim=0)
        sum_image = torch.stack([o.sum_image for o in other_banks]).sum(dim=0)
        sum_text = torch.stack([o.sum_text for o in other_banks]).sum(dim=0)
        update = (total >= self.min_count) & (total > 0)
        mean_image = sum_image / total.clamp(min=1e-12).unsqueeze(1)
        mean_text = sum_text / total.clamp(min=1e-12).unsqueeze(1)
        if renormalize:  # centroids of unit vectors are shorter than 1; prototypes live on the sphere
            mean_image, mean_text = F.normalize(mean_image, dim=1), F.normalize(mean_text, dim=1)
        self.prototypes_image = torch.where(update.unsqueeze(1), mean_image, self.prototypes_image)
        self.prototypes_text = torch.where(update.unsqueeze(1), mean_text, self.prototypes_text)
        self.initialized = self.initialized | update
        return update

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key).clone() for key in _KEYS}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [key for key in _KEYS if key not in state]
        if missing:
            raise KeyError(f"PrototypeBank.load_state_dict: missing {missing}")
        for key in _KEYS:
            current = getattr(self, key)
            value = torch.as_tensor(state[key])
            if value.shape != current.shape:
                raise ValueError(
                    f"PrototypeBank.load_state_dict: {key} has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
                )
            setattr(self, key, value.to(current.dtype).clone())
