"""Batched augmentation on the training device (``data.augment_on_device``): the MONAI pipeline's distributions and
geometry, seeded draws, the loader left with only the deterministic head, and the trainer augmenting training batches
(the plain and the DP loader) but never an eval dataset's."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Rotate
from torch.profiler import ProfilerActivity, profile

from bench.step_ops import count_host_reads, is_sync_op
from mlip_fed import pipeline
from mlip_fed.config import ConfigError
from mlip_fed.config_compose import compose_experiment
from mlip_fed.data.device_augment import AugmentDraw, DeviceAugment, batch_seed
from mlip_fed.data.transforms import build_device_head, build_transforms
from mlip_fed.privacy.engine import PoissonLoader, empty_batch
from mlip_fed.train.trainer import LocalTrainer, epoch_seed, standard_gradient

NO_AUGMENT = {"crop_scale": (1.0, 1.0), "rotate_degrees": 0.0, "brightness": 0.0, "contrast": 0.0}


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _draw(n: int, **values: float) -> AugmentDraw:
    fields = {"crop_h": 0, "crop_w": 0, "top": 0, "left": 0, "angle": 0, "shift": 0, "contrast": 0, **values}
    return AugmentDraw(**{k: torch.full((n,), float(v)) for k, v in fields.items()})


# ---------------------------------------------------------------------------- the module
def test_defaults_are_the_monai_pipelines() -> None:
    params = inspect.signature(build_transforms).parameters
    augment = DeviceAugment()
    for name in ("crop_scale", "rotate_degrees", "brightness", "contrast", "jitter_prob"):
        assert getattr(augment, name) == params[name].default, name
    crop = build_transforms(224, train=True).transforms[3]  # RandSpatialCrop: the same side range in pixels
    assert augment.crop_sides(224) == (crop.roi_size[0], crop.max_roi_size[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_normalised_range_are_kept(dtype) -> None:
    images = _images().to(dtype)
    out = DeviceAugment()(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert not torch.allclose(out, (images - 0.5) / 0.5)


def test_a_seed_fixes_the_draw_and_another_seed_changes_it() -> None:
    augment, images = DeviceAugment(), _images()
    a = augment(images, torch.Generator().manual_seed(3))
    b = augment(images, torch.Generator().manual_seed(3))
    c = augment(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # per-sample parameters: equal inputs would still differ
    assert batch_seed(0, 5, 0) != batch_seed(0, 5, 1) != batch_seed(1, 5, 1) and batch_seed(0, 5, 0) >= 0


def test_zero_magnitudes_are_the_eval_transform() -> None:
    images = _images()
    out = DeviceAugment(**NO_AUGMENT)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (images - 0.5) / 0.5, atol=1e-5, rtol=0)
    # The loader's head plus the identity augmentation is the eval pipeline, on a non-square decoded image.
    decoded = np.random.default_rng(0).random((40, 28)).astype(np.float32)
    head = build_device_head(32)(decoded)
    assert head.shape == (1, 32, 32) and 0.0 <= head.min() and head.max() <= 1.0
    evaluated = build_transforms(32, train=False)(decoded)
    torch.testing.assert_close(DeviceAugment(**NO_AUGMENT)(head[None])[0], evaluated, atol=1e-5, rtol=0)


def test_crop_and_rotation_resample_as_monai_does() -> None:
    images, size, augment = _images(1), 32, DeviceAugment()
    out = augment.apply(images, _draw(1, crop_h=20, crop_w=24, top=5, left=3)) * 0.5 + 0.5
    resized = F.interpolate(images[:, :, 5:25, 3:27], size=(size, size), mode="bilinear", align_corners=False)
    # Inside, the crop resized as MONAI's Resize does; only the border rows/columns interpolate past the crop edge.
    torch.testing.assert_close(out[..., 2:-2, 2:-2], resized[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    angle = math.radians(8)
    out = augment.apply(images, _draw(1, crop_h=size, crop_w=size, angle=angle)) * 0.5 + 0.5
    rotated = torch.as_tensor(Rotate(angle=angle, padding_mode="zeros", align_corners=False)(images[0]))
    torch.testing.assert_close(out[0, :, 4:-4, 4:-4], rotated[:, 4:-4, 4:-4], atol=1e-4, rtol=0)
    assert out[0, 0, 0, 0] == 0.0  # the rotated-away corner is zero padding


def test_intensity_jitter_is_a_shift_then_a_contrast_about_the_mean_then_a_clip() -> None:
    images = _images(1) * 0.5 + 0.25
    size = images.shape[-1]
    out = DeviceAugment().apply(images, _draw(1, crop_h=size, crop_w=size, shift=0.1, contrast=0.2)) * 0.5 + 0.5
    shifted = images + 0.1
    expected = ((shifted - shifted.mean()) * 1.2 + shifted.mean()).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_draws_follow_the_configured_ranges_and_rates() -> None:
    augment, n, size = DeviceAugment(), 20_000, 224
    draw = augment.sample(n, size, "cpu", torch.Generator().manual_seed(0))
    low, high = augment.crop_sides(size)
    for side, offset in ((draw.crop_h, draw.top), (draw.crop_w, draw.left)):
        assert torch.equal(side, side.round()) and side.min() == low and side.max() == high
        assert set(side.long().tolist()) == set(range(low, high + 1))  # every side length in the range occurs
        assert offset.min() == 0 and (offset + side).max() <= size and torch.equal(offset, offset.round())
    assert not torch.equal(draw.crop_h, draw.crop_w)  # the two sides are drawn independently, as MONAI does
    assert draw.angle.abs().max() <= math.radians(10) and abs(float(draw.angle.mean())) < math.radians(0.2)
    for values, bound in ((draw.shift, 0.1), (draw.contrast, 0.2)):
        applied = values != 0
        assert abs(float(applied.float().mean()) - 0.8) < 0.015  # jitter_prob, within ~3 standard deviations
        assert values.abs().max() <= bound and abs(float(values[applied].abs().mean()) - bound / 2) < 0.01 * bound * 5


def test_the_second_view_is_its_own_draw_and_an_empty_batch_passes() -> None:
    images = _images(4)
    out = DeviceAugment(second_view=True).augment_batch({"image": images, "ids": [1]}, torch.Generator().manual_seed(0))
    assert set(out) == {"image", "image_view2", "ids"} and not torch.equal(out["image"], out["image_view2"])
    assert out["image_view2"].shape == images.shape
    empty = empty_batch()
    assert DeviceAugment(second_view=True).augment_batch(empty) is empty


def test_the_augmentation_reads_nothing_back_to_the_host() -> None:
    augment, images = DeviceAugment(second_view=True), _images(8)
    with count_host_reads() as reads, profile(activities=[ProfilerActivity.CPU]) as prof:
        augment.augment_batch({"image": images}, torch.Generator().manual_seed(0))
    assert not [e.name for e in prof.events() if is_sync_op(e.name)] and not sum(reads.values())


# ---------------------------------------------------------------------------- config, dataset, trainer
def test_the_switch_is_off_by_default_on_in_the_gpu_config_and_validated() -> None:
    assert compose_experiment([]).data.augment_on_device is False
    assert compose_experiment(["train=gpu"]).data.augment_on_device is True
    with pytest.raises(ConfigError, match="augment_on_device"):
        compose_experiment(["data.augment_on_device=sometimes"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    overrides = ["experiment=smoke", f"data.root={root}", "train.batch_size=4", "train.num_threads=1"]
    cfg = compose_experiment([*overrides, "data.augment_on_device=true", "train.max_steps=2", "train.log_every=1"])
    data = pipeline.load_records(cfg.data)
    model = pipeline.build_model(cfg)
    return cfg, data.train[:8], model


def test_the_loader_runs_only_the_deterministic_head(setup) -> None:
    cfg, records, _ = setup
    dataset = pipeline.train_dataset(records, cfg)
    assert isinstance(dataset.device_augment, DeviceAugment) and dataset.device_augment.second_view
    items = []
    for epoch in (0, 1):
        dataset.reseed(epoch_seed(cfg.train.seed, epoch))
        items.append(dataset[3])
    assert "image_view2" not in items[0]  # drawn on the device from the one image
    assert torch.equal(items[0]["image"], items[1]["image"]) and 0.0 <= items[0]["image"].min()
    assert items[0]["image"].shape == (1, cfg.data.image_size, cfg.data.image_size)
    assert pipeline.eval_dataset(records, cfg).device_augment is None


class _Seen:
    """A gradient function that remembers the images each step's model saw (and, ``forward=False``, skips the model:
    an eval dataset has no second view for the divergence encoder)."""

    def __init__(self, forward: bool = True) -> None:
        self.batches: list[dict] = []
        self.forward = forward

    def __call__(self, model, batch, loss_scale):
        self.batches.append({k: v.clone() for k, v in batch.items() if k in ("image", "image_view2", "index")})
        return standard_gradient(model, batch, loss_scale) if self.forward else {"total": torch.zeros(())}


def _fit(cfg, model, loader, seed: int = 0, forward: bool = True) -> _Seen:
    seen = _Seen(forward)
    train_cfg = cfg.train.model_copy(update={"progress_bar": False, "seed": seed})
    LocalTrainer(model, train_cfg, total_steps=10, gradient_fn=seen).fit(loader, epochs=1)
    return seen


def test_a_training_step_augments_on_the_device_reproducibly(setup) -> None:
    cfg, records, model = setup
    collator = pipeline.build_collator(model, cfg)
    dataset = pipeline.train_dataset(records, cfg)
    runs = [_fit(cfg, model, pipeline.train_loader(dataset, collator, cfg), seed) for seed in (0, 0, 1)]
    assert len(runs[0].batches) == 2
    first = runs[0].batches[0]
    heads = torch.stack([dataset[int(i)]["image"] for i in first["index"]])
    assert -1 <= first["image"].min() < 0  # normalised on the device
    assert not torch.allclose(first["image"], (heads - 0.5) / 0.5, atol=1e-3)  # and augmented
    assert not torch.equal(first["image"], first["image_view2"])
    same = all(torch.equal(a["image"], b["image"]) for a, b in zip(runs[0].batches, runs[1].batches, strict=True))
    assert same and not torch.equal(runs[0].batches[0]["image"], runs[2].batches[0]["image"])


def test_the_dp_loader_is_augmented_and_an_eval_dataset_never(setup) -> None:
    cfg, records, model = setup
    collator = pipeline.build_collator(model, cfg)
    ids = [r.patient_id for r in records]
    poisson = PoissonLoader(pipeline.train_dataset(records, cfg), collator, ids, 0.5, num_buckets=4, seed=1)
    batch = next(b for b in _fit(cfg, model, poisson).batches if b["image"].numel())
    assert "image_view2" in batch and batch["image"].min() >= -1
    evaluated = pipeline.eval_dataset(records, cfg)  # bank statistics and evaluation read these items
    for seen in _fit(cfg, model, pipeline.train_loader(evaluated, collator, cfg), forward=False).batches:
        expected = torch.stack([evaluated[int(i)]["image"] for i in seen["index"]])
        assert torch.equal(seen["image"], expected) and "image_view2" not in seen
