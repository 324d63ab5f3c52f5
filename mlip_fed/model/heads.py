"""Projection heads into the shared 128-d space.

MGCA uses Linear-BN-ReLU-Linear-BN. BatchNorm couples the samples of a batch (so one record
influences every other record's embedding) and Opacus refuses it; these heads use LayerNorm, or
no norm, instead. Applied to [B, D] or [B, N, D] alike (a Linear over the last axis is MGCA's 1x1
Conv1d local head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.model.config import ProjectionConfig


class ProjectionHead(nn.Module):
    """Linear -> (LayerNorm) -> ReLU -> Linear -> (LayerNorm without affine); output L2-normalised."""

    def __init__(self, in_dim: int, cfg: ProjectionConfig) -> None:
        super().__init__()
        use_norm = cfg.norm == "layernorm"
        self.net = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden),
            nn.LayerNorm(cfg.hidden) if use_norm else nn.Identity(),
            nn.ReLU(inplace=False),
            nn.Linear(cfg.hidden, cfg.dim),
            # MGCA's last BN has no affine; LayerNorm without affine plays that role and has no parameters.
            nn.LayerNorm(cfg.dim, elementwise_affine=False) if use_norm else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)
