"""MONAI image transforms: decoded [H, W] array in [0, 1] → float tensor [1, S, S], mean/std 0.5.

Geometry first keeps the whole chest: the longest side is resized to S and the short side padded,
so no lung apex or costophrenic angle is cropped away before augmentation. Training adds a random
resized crop, a small rotation and brightness/contrast jitter, and never a horizontal flip: the
heart is on the left and reports say "left"/"right", so a flipped image contradicts its report.

MLIP's divergence (EMA) encoder sees a second augmentation of the same image; build it with
:func:`build_view_pair`, which seeds the two pipelines differently so the views differ.

With ``data.augment_on_device`` the loader runs only :func:`build_device_head` and the random part runs batched on
the training device (``device_augment.DeviceAugment``, same distributions).
"""

from __future__ import annotations

import math

import torch
from monai.transforms import (
    CenterSpatialCrop,
    Compose,
    EnsureChannelFirst,
    EnsureType,
    NormalizeIntensity,
    RandRotate,
    RandScaleIntensityFixedMean,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
    SpatialPad,
    ThresholdIntensity,
)

#: Intensity mean/std the encoders expect: [0, 1] becomes [-1, 1].
NORMALISE_MEAN = 0.5
NORMALISE_STD = 0.5


def _geometry(image_size: int) -> list:
    return [
        EnsureChannelFirst(channel_dim="no_channel"),
        Resize(spatial_size=image_size, size_mode="longest", mode="area"),
        SpatialPad(spatial_size=(image_size, image_size), method="symmetric", mode="constant"),
    ]


def _finish() -> list:
    return [
        NormalizeIntensity(subtrahend=NORMALISE_MEAN, divisor=NORMALISE_STD),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ]


def build_transforms(
    image_size: int,
    train: bool,
    seed: int = 0,
    *,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    rotate_degrees: float = 10.0,
    brightness: float = 0.1,
    contrast: float = 0.2,
    jitter_prob: float = 0.8,
) -> Compose:
    """The train (random) or eval (deterministic) pipeline for square images of side ``image_size``.

    ``crop_scale`` bounds the crop's area as a fraction of the padded square; ``brightness`` is an
    additive shift and ``contrast`` a multiplicative factor around the image mean, both on [0, 1]
    intensities, which are clipped back to [0, 1] before normalisation.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    if not train:
        pipeline = Compose([*_geometry(image_size), CenterSpatialCrop(roi_size=(image_size, image_size)), *_finish()])
        pipeline.set_random_state(seed=seed)
        return pipeline
    min_side = max(1, round(image_size * math.sqrt(crop_scale[0])))
    max_side = max(min_side, round(image_size * math.sqrt(crop_scale[1])))
    pipeline = Compose(
        [
            *_geometry(image_size),
            RandSpatialCrop(
                roi_size=(min_side, min_side), max_roi_size=(max_side, max_side), random_center=True, random_size=True
            ),
            Resize(spatial_size=(image_size, image_size), mode="bilinear"),
            RandRotate(range_x=math.radians(rotate_degrees), prob=1.0, keep_size=True, padding_mode="zeros"),
            RandShiftIntensity(offsets=brightness, prob=jitter_prob),
            RandScaleIntensityFixedMean(factors=contrast, prob=jitter_prob),
            ThresholdIntensity(threshold=0.0, above=True, cval=0.0),
            ThresholdIntensity(threshold=1.0, above=False, cval=1.0),
            *_finish(),
        ]
    )
    pipeline.set_random_state(seed=seed)
    return pipeline


def build_device_head(image_size: int) -> Compose:
    """The cheap CPU part of the train pipeline when augmentation runs on the device (``data.augment_on_device``).

    The train pipeline's deterministic geometry (channel-first, resize longest side, pad) and nothing else:
    [1, S, S] float32 in [0, 1], not normalised. ``device_augment.DeviceAugment`` adds the random tail, the clip and
    the normalisation on the batch; nothing here is random, so the dataset caches the whole result per record.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    return Compose([*_geometry(image_size), EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False)])


def build_mask_transform(image_size: int) -> Compose:
    """Integer label mask [H, W] → [1, S, S] with the eval geometry, nearest-neighbour so labels stay labels."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            Resize(spatial_size=image_size, size_mode="longest", mode="nearest"),
            SpatialPad(spatial_size=(image_size, image_size), method="symmetric", mode="constant"),
            CenterSpatialCrop(roi_size=(image_size, image_size)),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def build_view_pair(image_size: int, seed: int = 0, **augment: float) -> tuple[Compose, Compose]:
    """Two independently seeded training pipelines: the view for the online encoder and for the EMA one."""
    first = build_transforms(image_size, train=True, seed=seed, **augment)
    second = build_transforms(image_size, train=True, seed=second_view_seed(seed), **augment)
    return first, second


def second_view_seed(seed: int) -> int:
    """A seed for the second view that never collides with the first for the same base seed."""
    return (seed * 2654435761 + 0x9E3779B9) % (2**32)
