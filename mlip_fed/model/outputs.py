"""Typed outputs of MLIPModel, so callers never index tuples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageOutput:
    pooled: torch.Tensor  # [B, Dv] pre-projection (linear probes use this)
    embedding: torch.Tensor  # [B, 128] L2-normalised
    patches: torch.Tensor  # [B, P, 128] L2-normalised
    grid: tuple[int, int]  # (h, w), h*w = P
    patch_weights: torch.Tensor  # [B, P], rows sum to 1
    patch_features: torch.Tensor  # [B, P, Dp] pre-projection


@dataclass
class TextOutput:
    pooled: torch.Tensor  # [B, Dt] pre-projection [CLS]
    embedding: torch.Tensor  # [B, 128] L2-normalised
    words: torch.Tensor  # [B, M, 128] L2-normalised
    word_mask: torch.Tensor  # [B, M] bool
    word_weights: torch.Tensor  # [B, M], rows sum to 1 over real words
    tokens: torch.Tensor  # [B, L, Dt] pre-projection token states (ITM fusion input)


@dataclass
class LossOutput:
    """``total`` = sum of weight * part over enabled objectives; ``parts`` are unweighted, keyed by objective."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def nonfinite(self) -> list[str]:
        """Names of the objectives whose value is NaN or inf."""
        return [name for name, value in self.parts.items() if not bool(torch.isfinite(value).all())]
