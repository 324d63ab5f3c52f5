"""Supervised ceiling: the image tower with a linear 14-way CheXpert head and a masked BCE loss.

Not an MLIP objective: a reference point. The same image tower, trained on the same pretraining
studies with their CheXpert labels instead of their reports, bounds what the frozen-encoder linear
probe can expect from that tower at that budget (``objectives=supervised``; docs/results.md).

Labels come from the batch (``batch["labels"]`` [B, 14]: 1 / 0 / -1 / NaN, the manifest's or the
labeler's CheXpert coding). How the two non-binary codes enter the loss is a policy:

* ``uncertain`` (-1): ``mask`` (U-Ignore, default: the entry is left out of the loss), ``positive``
  (U-Ones) or ``negative`` (U-Zeros);
* ``blank`` (NaN, not mentioned): ``negative`` (default: CheXpert's training convention and the linear
  probe's, and on SynthCXR a category no report mentions is never drawn) or ``mask``.

The loss is the mean BCE over the unmasked entries of the batch. With ``group_ids`` (DP buckets) it
is instead ``sum(unmasked BCE) / (B * 14)``: a sum of per-sample terms, so
``loss(batch) = sum_g (n_g / B) * loss(group g alone)`` as bucketed clipping needs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

UncertainPolicy = Literal["mask", "positive", "negative"]
BlankPolicy = Literal["negative", "mask"]


def supervised_targets(
    labels: torch.Tensor, *, uncertain: UncertainPolicy = "mask", blank: BlankPolicy = "negative"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary targets [B, K] and a [B, K] float mask (1 = in the loss) from raw CheXpert labels."""
    if labels.ndim != 2:
        raise ValueError(f"supervised: labels must be [B, K], got {tuple(labels.shape)}")
    if uncertain not in ("mask", "positive", "negative"):
        raise ValueError(f"supervised: unknown uncertain policy {uncertain!r}; expected mask, positive or negative")
    if blank not in ("negative", "mask"):
        raise ValueError(f"supervised: unknown blank policy {blank!r}; expected negative or mask")
    labels = labels.float()
    is_blank = torch.isnan(labels)
    is_uncertain = labels == -1.0
    targets = (labels == 1.0).float()
    if uncertain == "positive":
        targets = torch.where(is_uncertain, torch.ones_like(targets), targets)
    mask = torch.ones_like(targets)
    if uncertain == "mask":
        mask = mask.masked_fill(is_uncertain, 0.0)
    if blank == "mask":
        mask = mask.masked_fill(is_blank, 0.0)
    return targets, mask


def masked_bce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    uncertain: UncertainPolicy = "mask",
    blank: BlankPolicy = "negative",
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE-with-logits over the entries the policies keep; 0 (with a gradient path) when none is kept."""
    if logits.shape != labels.shape:
        raise ValueError(f"supervised: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    targets, mask = supervised_targets(labels.to(logits.device), uncertain=uncertain, blank=blank)
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    total = (per_entry * mask.to(per_entry.dtype)).sum()
    if group_ids is not None:
        if group_ids.shape != logits.shape[:1]:
            raise ValueError(f"supervised: group_ids must have shape [{logits.shape[0]}], got {tuple(group_ids.shape)}")
        return total / logits.numel()
    return total / mask.sum().clamp(min=1.0)


class SupervisedHead(nn.Module):
    """A linear layer from the image tower's pooled feature to one logit per CheXpert category."""

    def __init__(
        self, in_dim: int, num_classes: int, *, uncertain: UncertainPolicy = "mask", blank: BlankPolicy = "negative"
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        self.uncertain = uncertain
        self.blank = blank

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, K]."""
        return self.linear(pooled)

    def loss(self, pooled: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        return masked_bce_loss(self(pooled), labels, uncertain=self.uncertain, blank=self.blank, group_ids=group_ids)
