"""Per-category bank statistics in which one privacy unit contributes at most 1 to every row and count it touches.

Why: the prototype release is accounted with sensitivity sqrt(L) per statistic (``privacy.release``), which holds
only if a unit moves each category row by at most 1. Summing a patient's k studies positive for category c moves
row c and count c by k. So a unit's records are averaged per category first: the mean of its unit-norm image
embeddings positive for c (norm <= 1), the same for text, and a count of 1. The resulting sums are sums over units
of per-unit means; the counts are numbers of units.

Memory: one running (image, text) sum per (unit, positive category) pair seen, i.e. O(pairs x dim), about the size
of the embeddings themselves; the loader need not be ordered by unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class UnitCategoryMeans:
    """Accumulates (unit, category) sums over batches; ``totals()`` gives the bounded per-category statistics."""

    def __init__(self, num_categories: int, dim: int) -> None:
        self.num_categories = num_categories
        self.dim = dim
        self._image: dict[tuple[str, int], torch.Tensor] = {}
        self._text: dict[tuple[str, int], torch.Tensor] = {}
        self._n: dict[tuple[str, int], int] = {}

    @torch.no_grad()
    def add(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, units: Sequence[str]) -> None:
        """A batch: embeddings [B, d] (normalised here), CheXpert labels [B, K] (only 1.0 counts), unit ids [B]."""
        if labels.shape != (len(units), self.num_categories):
            raise ValueError(f"labels {tuple(labels.shape)} do not match {len(units)} units x {self.num_categories}")
        image = F.normalize(image.detach().float().cpu(), dim=1)
        text = F.normalize(text.detach().float().cpu(), dim=1)
        positive = (labels == 1.0).cpu()  # NaN == 1 is False
        for row, unit in enumerate(units):
            for c in positive[row].nonzero(as_tuple=True)[0].tolist():
                key = (str(unit), c)
                if key in self._n:
                    self._image[key] += image[row]
                    self._text[key] += text[row]
                    self._n[key] += 1
                else:
                    self._image[key] = image[row].clone()
                    self._text[key] = text[row].clone()
                    self._n[key] = 1

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(sum_image [K, d], sum_text [K, d], count [K], largest number of categories one unit touches)."""
        sum_image = torch.zeros(self.num_categories, self.dim)
        sum_text = torch.zeros(self.num_categories, self.dim)
        count = torch.zeros(self.num_categories)
        per_unit: dict[str, int] = {}
        for (unit, c), n in self._n.items():
            sum_image[c] += self._image[(unit, c)] / n
            sum_text[c] += self._text[(unit, c)] / n
            count[c] += 1.0
            per_unit[unit] = per_unit.get(unit, 0) + 1
        return sum_image, sum_text, count, max(per_unit.values(), default=0)
