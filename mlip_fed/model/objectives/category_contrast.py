"""Knowledge-guided category-level contrast (docs/method.md, "category" rows).

Prototypes = K_c knowledge prototypes (one per CheXpert category, initialised from the projected
text embedding of its knowledge-base description, so every site starts from the same rows for the
same seed and weights) + K_f free prototypes (MGCA's SwAV-style layer). Codes are batch-local
Sinkhorn-Knopp assignments mixed with the report's expert labels; each modality predicts the
other's codes (swapped prediction).

Groups (DP buckets): with ``group_ids`` the Sinkhorn codes are computed within each group only
(the equipartition couples every row of the batch otherwise); the loss is still the mean over rows,
so ``loss(batch) = sum_g (n_g / B) * loss(group g alone)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.model.objectives.sinkhorn import sinkhorn


class _FrozenPrototypes(nn.Module):
    """Knowledge prototypes as a persistent buffer: shipped in ``state_dict`` but never trained.

    Kept in a module without parameters: Opacus rejects trainable modules that own buffers.
    """

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).t()


def label_targets(labels: torch.Tensor, num_prototypes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised multi-hot over the first ``labels.shape[1]`` prototypes from CheXpert labels (1.0 = positive).

    Uncertain (-1), negative (0) and unmentioned (NaN) do not count. Returns targets [B, K] and a [B] mask of
    rows with at least one positive (the others are not mixed).
    """
    positive = (labels == 1.0).to(torch.float32)
    counts = positive.sum(dim=1, keepdim=True)
    target = positive / counts.clamp(min=1)
    pad = num_prototypes - labels.shape[1]
    if pad < 0:
        raise ValueError(f"{labels.shape[1]} label columns but only {num_prototypes} prototypes")
    return F.pad(target, (0, pad)), counts.squeeze(1) > 0


class CategoryContrast(nn.Module):
    """Swapped prediction of label-mixed Sinkhorn codes across modalities."""

    def __init__(
        self,
        dim: int,
        num_knowledge: int,
        num_free: int,
        *,
        epsilon: float = 0.05,
        iterations: int = 3,
        temperature: float = 0.2,
        label_mix: float = 0.3,
        freeze_knowledge: bool = True,
    ) -> None:
        super().__init__()
        self.num_knowledge = num_knowledge
        self.num_free = num_free
        self.epsilon = epsilon
        self.iterations = iterations
        self.temperature = temperature
        self.label_mix = label_mix
        self.freeze_knowledge = freeze_knowledge
        self.knowledge: nn.Module
        if freeze_knowledge:
            self.knowledge = _FrozenPrototypes(num_knowledge, dim)
        else:
            self.knowledge = nn.Linear(dim, num_knowledge, bias=False)
        self.free = nn.Linear(dim, num_free, bias=False) if num_free > 0 else None
        if self.free is not None:
            with torch.no_grad():
                self.free.weight.copy_(F.normalize(torch.randn_like(self.free.weight), dim=1))

    @property
    def num_prototypes(self) -> int:
        return self.num_knowledge + self.num_free

    @torch.no_grad()
    def set_knowledge_prototypes(self, prototypes: torch.Tensor) -> None:
        """Overwrite the knowledge rows (unit-normalised), e.g. from KB text or a merged prototype bank."""
        weight = self.knowledge.weight
        if prototypes.shape != weight.shape:
            raise ValueError(f"knowledge prototypes must be {tuple(weight.shape)}, got {tuple(prototypes.shape)}")
        weight.copy_(F.normalize(prototypes.to(weight), dim=1))

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project trainable rows back to the unit sphere (MGCA does this every step, before the forward)."""
        for layer in (self.free, self.knowledge if not self.freeze_knowledge else None):
            if layer is not None:
                layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.knowledge(x)]
        if self.free is not None:
            parts.append(self.free(x))
        return torch.cat(parts, dim=1)

    def _codes(self, scores: torch.Tensor, group_ids: torch.Tensor | None) -> torch.Tensor:
        if group_ids is None:
            return sinkhorn(scores, self.epsilon, self.iterations)
        if group_ids.shape != scores.shape[:1]:
            raise ValueError(
                f"category contrast: group_ids must have shape [{scores.shape[0]}], got {tuple(group_ids.shape)}"
            )
        codes = torch.empty_like(scores)
        group_ids = group_ids.to(scores.device)
        for g in torch.unique(group_ids):
            rows = (group_ids == g).nonzero(as_tuple=True)[0]
            codes[rows] = sinkhorn(scores[rows], self.epsilon, self.iterations)
        return codes

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``image``/``text`` [B, d] L2-normalised global embeddings; ``labels`` [B, K_c] CheXpert coding."""
        self.normalize_prototypes_()
        z_v, z_t = self.scores(image), self.scores(text)
        q_v = self._codes(z_v.detach(), group_ids)
        q_t = self._codes(z_t.detach(), group_ids)
        if self.label_mix > 0:
            y, has_label = label_targets(labels.to(image.device), self.num_prototypes)
            y = y.to(q_v.dtype)
            mix = (self.label_mix * has_label.to(q_v.dtype)).unsqueeze(1)
            q_v = (1 - mix) * q_v + mix * y
            q_t = (1 - mix) * q_t + mix * y
        loss_v = -(q_t * F.log_softmax(z_v / self.temperature, dim=1)).sum(dim=1).mean()
        loss_t = -(q_v * F.log_softmax(z_t / self.temperature, dim=1)).sum(dim=1).mean()
        return 0.5 * (loss_v + loss_t)
