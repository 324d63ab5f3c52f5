"""The training augmentation as one batched torch module, for the device the model trains on (``data.augment_on_device``).

The MONAI train pipeline (``transforms.build_transforms``) costs tens of ms per study on one CPU core at 224², so a
GPU step that eats thousands of images a second would need dozens of loader cores. With ``data.augment_on_device`` the
loader runs only the deterministic head (``transforms.build_device_head``: resize the longest side, pad, [0, 1]
intensities; cached per record) and the trainer applies :class:`DeviceAugment` to the batch right after moving it to
the device: one ``affine_grid``/``grid_sample`` for the whole batch and a few vectorised intensity ops, with no
device-to-host read.

Same distributions and ranges as the MONAI pipeline, drawn per sample: a crop whose sides are each a uniform integer in
[round(S·√min_scale), round(S·√max_scale)] at a uniform integer offset, resized to S×S (bilinear); a rotation by a
uniform angle in ±``rotate_degrees`` about the centre with zero padding; with probability ``jitter_prob`` an additive
brightness shift U(±``brightness``), then with probability ``jitter_prob`` a contrast factor 1 + U(±``contrast``) about
the image mean; clip to [0, 1]; normalise with mean/std 0.5. Deliberate differences, one line each:

- crop-resize and rotation are one resampling (one bilinear interpolation, not two), so the result is slightly sharper;
- the crop's border pixels interpolate with the pixels just outside the crop (MONAI's resize repeats the crop's edge);
- outside the rotated crop is exactly zero (a hard edge) where MONAI's bilinear zero padding fades over one pixel;
- the random stream is torch's (per-batch generator), not MONAI's numpy one, so pixels differ for equal seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.data.transforms import NORMALISE_MEAN, NORMALISE_STD

#: Batch keys that carry images [B, C, S, S] the augmentation applies to.
IMAGE_KEYS = ("image", "image_view2")


@dataclass(frozen=True)
class AugmentDraw:
    """One batch's random parameters, tensors of length B on the batch's device (pixels and radians)."""

    crop_h: torch.Tensor
    crop_w: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    angle: torch.Tensor
    shift: torch.Tensor
    contrast: torch.Tensor


class DeviceAugment(nn.Module):
    """Random resized crop, rotation, brightness/contrast jitter, clip and normalisation of [B, C, S, S] images in [0, 1].

    The defaults are ``build_transforms``'s (a test holds them equal). ``second_view``: the model's divergence (EMA)
    encoder reads a second augmentation of each image; :meth:`augment_batch` then derives ``image_view2`` from the
    un-augmented ``image`` with its own draw, so the loader ships one image per study instead of two identical ones.
    """

    def __init__(
        self,
        *,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        rotate_degrees: float = 10.0,
        brightness: float = 0.1,
        contrast: float = 0.2,
        jitter_prob: float = 0.8,
        second_view: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        if rotate_degrees < 0 or brightness < 0 or contrast < 0 or not 0.0 <= jitter_prob <= 1.0:
            raise ValueError(
                "rotate_degrees, brightness and contrast must be >= 0 and jitter_prob in [0, 1], got "
                f"{rotate_degrees}, {brightness}, {contrast}, {jitter_prob}"
            )
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.rotate_degrees = float(rotate_degrees)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.jitter_prob = float(jitter_prob)
        self.second_view = second_view

    def extra_repr(self) -> str:
        return (
            f"crop_scale={self.crop_scale}, rotate_degrees={self.rotate_degrees}, brightness={self.brightness}, "
            f"contrast={self.contrast}, jitter_prob={self.jitter_prob}, second_view={self.second_view}"
        )

    def crop_sides(self, size: int) -> tuple[int, int]:
        """The crop side range in pixels for an S×S image, rounded as ``build_transforms`` rounds it."""
        low = max(1, round(size * math.sqrt(self.crop_scale[0])))
        return low, max(low, round(size * math.sqrt(self.crop_scale[1])))

    def sample(
        self, batch: int, size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> AugmentDraw:
        """Per-sample parameters for ``batch`` S×S images, drawn on ``device`` (from ``generator`` when given)."""
        low, high = self.crop_sides(size)

        def uniform(n: int = batch) -> torch.Tensor:
            return torch.rand(n, device=device, generator=generator, dtype=torch.float32)

        def integer(lo: torch.Tensor | int, hi: torch.Tensor | int) -> torch.Tensor:  # uniform in [lo, hi]
            return (lo + torch.floor(uniform() * (hi - lo + 1))).clamp(max=hi)

        crop_h = integer(low, high)
        crop_w = integer(low, high)
        top = integer(0, size - crop_h)
        left = integer(0, size - crop_w)
        angle = (2 * uniform() - 1) * math.radians(self.rotate_degrees)
        shift = torch.where(uniform() < self.jitter_prob, (2 * uniform() - 1) * self.brightness, 0.0)
        contrast = torch.where(uniform() < self.jitter_prob, (2 * uniform() - 1) * self.contrast, 0.0)
        return AugmentDraw(crop_h, crop_w, top, left, angle, shift, contrast)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented, normalised images; a batch of none comes back as it is."""
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"DeviceAugment expects square [B, C, S, S] images, got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return images
        return self.apply(images, self.sample(images.shape[0], images.shape[-1], images.device, generator))

    def apply(self, images: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """The augmentation with the given parameters (``sample`` draws them; tests pass their own)."""
        size = images.shape[-1]
        x = images.float()
        # Output pixel o (normalised, align_corners=False) comes from the resized crop at m = R·o, R the rotation
        # MONAI's ``Rotate(angle)`` samples with, which is input pixel (crop centre + crop half-size · m): one affine
        # map from output to input per sample.
        cos, sin = torch.cos(draw.angle), -torch.sin(draw.angle)
        sx, sy = draw.crop_w / size, draw.crop_h / size
        tx = (2 * draw.left + draw.crop_w) / size - 1
        ty = (2 * draw.top + draw.crop_h) / size - 1
        theta = torch.stack(
            [torch.stack([sx * cos, -sx * sin, tx], -1), torch.stack([sy * sin, sy * cos, ty], -1)], dim=1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Zero where the rotation looks outside the crop (MONAI pads the rotated crop with zeros): |R·o| <= 1.
        coords = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # pixel centres
        ox, oy = coords.view(1, 1, -1), coords.view(1, -1, 1)
        cos_, sin_ = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
        inside = ((cos_ * ox - sin_ * oy).abs() <= 1) & ((sin_ * ox + cos_ * oy).abs() <= 1)
        out = out * inside.unsqueeze(1)
        out = out + draw.shift.view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + draw.contrast.view(-1, 1, 1, 1)) + mean
        out = out.clamp(0.0, 1.0)
        return ((out - NORMALISE_MEAN) / NORMALISE_STD).to(images.dtype)

    def augment_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """``batch`` with every image key augmented (its tensors already on the device); with ``second_view`` and no
        ``image_view2`` in the batch, that view is a second draw from the un-augmented ``image``."""
        image = batch.get("image")
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] == 0:
            return batch  # e.g. a DP step that sampled nobody: nothing to augment
        out = dict(batch)
        for key in IMAGE_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                out[key] = self(batch[key], generator)
        if self.second_view and "image_view2" not in batch:
            out["image_view2"] = self(image, generator)
        return out


def batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """The augmentation seed of micro-batch ``micro_batch`` of optimiser step ``step`` for a trainer seeded ``seed``:
    a function of the position, so a resumed run draws what the uninterrupted one drew, and of the trainer's seed,
    which under DP is the site's secret one (the augmentation must not be derivable from public values)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + (micro_batch + 1) * 0x94D049BB133111EB) % 2**64
    mixed ^= mixed >> 31
    return mixed % 2**63
