"""Image towers: a MONAI ViT or a GroupNorm ResNet built from MONAI blocks, for 2-D grey images.

Both return the same three things (pooled global feature, a grid of patch features, per-patch
weights) so the objectives never care which backbone runs. Everything here is built to pass
Opacus' per-sample-gradient hooks: GroupNorm instead of BatchNorm, no in-place ops on activations,
no parameter that is built but unused, and raw ``nn.Parameter``s only on leaf modules whose first
positional input is the activation (Opacus' functorch fallback needs that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

import torch
from monai.networks.nets import ViT
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from mlip_fed.model.config import ImageEncoderConfig

if TYPE_CHECKING:
    from mlip_fed.model.pretrained_weights import WeightLoadReport

#: (hidden, mlp, layers, heads) per ViT preset.
_VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny": (128, 256, 4, 4),
    "vit_b16": (768, 3072, 12, 12),
}
#: (block, layers, planes, max-pool in the stem) per ResNet preset.
_RESNET_PRESETS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], bool]] = {
    "resnet_tiny": ("basic", (1, 1, 1, 1), (16, 32, 64, 128), False),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), True),
}


@dataclass
class ImageFeatures:
    """Pre-projection outputs of an image tower."""

    pooled: torch.Tensor  # [B, Dv]
    patches: torch.Tensor  # [B, P, Dp]
    grid: tuple[int, int]
    #: CLS->patch attention (ViT, last block, mean over heads) or uniform (ResNet); rows sum to 1, no grad.
    patch_weights: torch.Tensor  # [B, P]


class _ClsToken(nn.Module):
    """Prepends a learned [CLS] token; a leaf module so Opacus can give it per-sample gradients."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class ViTImageEncoder(nn.Module):
    """MONAI ViT with a [CLS] token; CLS = global feature, the rest = patch grid."""

    #: What ``build_image_encoder`` loaded into this tower (None: random init).
    load_report: WeightLoadReport | None = None

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        hidden, mlp, layers, heads = _VIT_PRESETS[cfg.arch]
        self.vit = ViT(
            in_channels=1,
            img_size=(cfg.image_size, cfg.image_size),
            patch_size=(cfg.patch_size, cfg.patch_size),
            hidden_size=hidden,
            mlp_dim=mlp,
            num_layers=layers,
            num_heads=heads,
            spatial_dims=2,
            classification=False,
            dropout_rate=cfg.dropout,
            save_attn=True,
            qkv_bias=cfg.qkv_bias,
        )
        for i, block in enumerate(self.vit.blocks):
            # MONAI always builds norm_cross_attn; unused, it would leave a parameter without gradient (Opacus fails).
            block.norm_cross_attn = nn.Identity()
            # Only the last block's CLS->patch attention is needed; skip storing the others.
            block.attn.save_attn = i == len(self.vit.blocks) - 1
        self.cls = _ClsToken(hidden)
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.pooled_dim = hidden
        self.patch_dim = hidden
        self.pooling = cfg.pooling

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        x = self.cls(self.vit.patch_embedding(images))
        for block in self.vit.blocks:
            x = block(x)
        x = self.vit.norm(x)
        attn = self.vit.blocks[-1].attn.att_mat  # [B, H, N, N], detached by MONAI
        weights = attn[:, :, 0, 1:].mean(dim=1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        pooled = x[:, 1:].mean(dim=1) if self.pooling == "mean" else x[:, 0]
        return ImageFeatures(pooled=pooled, patches=x[:, 1:], grid=self.grid, patch_weights=weights)


def _residual_forward(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    residual = block.downsample(x) if block.downsample is not None else x
    return block.act(out + residual)  # out-of-place: Opacus' backward hooks forbid `out += residual`


class _BasicBlock(ResNetBlock):
    """MONAI ResNetBlock with an out-of-place residual (the upstream ``+=`` breaks Opacus hooks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return _residual_forward(self, x, out)


class _Bottleneck(ResNetBottleneck):
    """MONAI ResNetBottleneck with an out-of-place residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _residual_forward(self, x, out)


class ResNetImageEncoder(nn.Module):
    """GroupNorm ResNet from MONAI blocks. Global = avg-pooled layer4, patches = layer3 (MGCA).

    MONAI's ``ResNet`` does not pass ``norm``/``act`` to its blocks, so the stack is assembled here.
    """

    #: What ``build_image_encoder`` loaded into this tower (None: random init).
    load_report: WeightLoadReport | None = None

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        kind, layers, planes, max_pool = _RESNET_PRESETS[cfg.arch]
        block_cls: type[ResNetBlock] | type[ResNetBottleneck] = _BasicBlock if kind == "basic" else _Bottleneck
        expansion = block_cls.expansion
        channels = [planes[0], *planes, *(p * expansion for p in planes)]
        groups = min(32, reduce(math.gcd, channels))
        norm = ("group", {"num_groups": groups})
        act = ("relu", {"inplace": False})
        self.conv1 = nn.Conv2d(1, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.GroupNorm(groups, planes[0])
        self.act = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if max_pool else nn.Identity()
        in_planes = planes[0]
        stages = []
        for i, (n_blocks, width) in enumerate(zip(layers, planes, strict=True)):
            stride = 1 if i == 0 else 2
            out_planes = width * expansion
            downsample = None
            if stride != 1 or in_planes != out_planes:
                downsample = nn.Sequential(
                    nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                    nn.GroupNorm(groups, out_planes),
                )
            blocks = [
                block_cls(in_planes, width, spatial_dims=2, stride=stride, downsample=downsample, act=act, norm=norm)
            ]
            blocks += [block_cls(out_planes, width, spatial_dims=2, act=act, norm=norm) for _ in range(1, n_blocks)]
            stages.append(nn.Sequential(*blocks))
            in_planes = out_planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        stem_stride = 4 if max_pool else 2
        side = math.ceil(cfg.image_size / stem_stride / 4)  # layer2 and layer3 each halve
        self.grid = (side, side)
        self.pooled_dim = planes[3] * expansion
        self.patch_dim = planes[2] * expansion

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        x = self.maxpool(self.act(self.bn1(self.conv1(images))))
        x = self.layer2(self.layer1(x))
        local = self.layer3(x)
        pooled = self.layer4(local).mean(dim=(2, 3))
        b, c, h, w = local.shape
        patches = local.flatten(2).transpose(1, 2)  # [B, h*w, C]
        weights = torch.full((b, h * w), 1.0 / (h * w), device=images.device, dtype=images.dtype)
        return ImageFeatures(pooled=pooled, patches=patches, grid=(h, w), patch_weights=weights)


def build_image_encoder(cfg: ImageEncoderConfig) -> ViTImageEncoder | ResNetImageEncoder:
    """Build the configured tower and load ``cfg.pretrained_path`` if given (any layout ``pretrained_weights`` reads).

    The load's ``WeightLoadReport`` is kept on the tower as ``load_report`` (None without pretrained weights).
    """
    from mlip_fed.model.pretrained_weights import load_image_weights

    encoder: ViTImageEncoder | ResNetImageEncoder
    encoder = ViTImageEncoder(cfg) if cfg.arch.startswith("vit") else ResNetImageEncoder(cfg)
    encoder.load_report = load_image_weights(encoder, cfg) if cfg.pretrained_path is not None else None
    return encoder
