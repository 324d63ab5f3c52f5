"""Segmentation on frozen patch features: a small decoder trained on cached ``.patches``.

The encoder stays frozen (evaluators never train the encoder they measure), so its patch embeddings are extracted
once and a light decoder — conv, then (×2 upsample, conv) until the patch grid reaches the mask
size, then a 1×1 classifier — is trained on them for a few epochs. It measures how much spatial
information the patch embeddings carry, which is what the local token–patch alignment objective is
meant to improve. Patches are assumed row-major over the grid (ViT token order, ``flatten(2)`` of a
conv map).

Masks are single-label: 0 = background, k = ``class_names[k-1]``. Prediction is the per-pixel argmax
(for one finding that equals thresholding the softmax at 0.5). Dice is MONAI's ``DiceMetric``, per image and
per class, with empty ground truth and empty prediction scoring 1 (MGCA's convention), averaged over images;
``dice_positive`` averages only over images that contain the class. The loss is MONAI's ``DiceCELoss`` with
class weights: findings cover a few per cent of the pixels, and unweighted, the probe settles on background
everywhere (Dice on positives 0 for every encoder, the supervised one included). Training is deterministic
on CPU for a given seed (the global RNG is forked, so the caller's stream is untouched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.nn import functional as F

from mlip_fed.eval.linear_probe import NanFloat, macro_mean


class SegmentationDecoder(nn.Module):
    """Patch grid [B, D, h, w] → logits [B, num_classes, S, S]."""

    def __init__(
        self, in_channels: int, num_classes: int, grid: tuple[int, int], out_size: int, hidden: int = 64
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must include background and ≥1 class, got {num_classes}")
        if out_size < max(grid):
            raise ValueError(f"output size {out_size} is smaller than the patch grid {grid}")
        self.out_size = out_size
        n_up = max(0, math.ceil(math.log2(out_size / min(grid))))
        layers: list[nn.Module] = [_conv_block(in_channels, hidden)]
        channels = hidden
        for _ in range(n_up):
            nxt = max(16, channels // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv_block(channels, nxt)]
            channels = nxt
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.body(x))
        if logits.shape[-2:] != (self.out_size, self.out_size):
            logits = F.interpolate(logits, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return logits


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: the same decoder runs with tiny site batches.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU())


def patches_to_grid(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """[N, P, D] row-major patch tokens → [N, D, h, w]."""
    n, p, d = patches.shape
    h, w = grid
    if p != h * w:
        raise ValueError(f"{p} patches do not fill grid {grid}")
    return patches.reshape(n, h, w, d).permute(0, 3, 1, 2).contiguous()


def dice_scores(pred: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-image Dice [N, K] for foreground classes 1..K and a mask [N, K] of images containing the class.

    Dice = 2|P∩G| / (|P| + |G|), and 1 when both are empty (MONAI's ``DiceMetric`` with ``ignore_empty=False``).
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [N, H, W]")
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False, num_classes=num_classes)
    dice = metric(pred.unsqueeze(1), target.unsqueeze(1)).double()
    present = torch.stack([(target == k).flatten(1).any(1) for k in range(1, num_classes)], 1)
    return dice, present


class SegmentationResult(BaseModel):
    """Test Dice of the decoder per class and averaged over classes."""

    model_config = ConfigDict(extra="forbid")

    class_names: list[str]
    dice: dict[str, float]  # mean over all test images (empty/empty = 1)
    dice_positive: dict[str, NanFloat]  # mean over test images that contain the class
    mean_dice: float
    mean_dice_positive: NanFloat
    epochs: int
    final_train_loss: NanFloat
    n_train: int
    n_test: int


def class_weights(masks: Tensor, num_classes: int) -> Tensor:
    """Per-class loss weights [num_classes]: sqrt of inverse pixel frequency in ``masks``, background = 1.

    Full inverse frequency overshoots (the probe then paints a finding over every pixel); the square root
    balances without that. A class absent from ``masks`` gets weight 1: it never is a target anyway.
    """
    counts = torch.bincount(masks.flatten(), minlength=num_classes).double()
    freq = counts / counts.sum()
    weights = torch.where(counts > 0, (freq[0].clamp_min(1e-12) / freq.clamp_min(1e-12)).sqrt(), torch.ones_like(freq))
    return weights.float()


def _loss_fn(masks: Tensor, num_classes: int, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy + soft Dice over the foreground classes, both class-weighted (``class_weights``).

    The Dice term is over the whole batch (``batch=True``): a finding absent from one image is no reason to
    punish that image's prediction by a full Dice loss.
    """
    loss = DiceCELoss(
        include_background=False,
        to_onehot_y=True,
        softmax=True,
        batch=True,
        weight=class_weights(masks, num_classes),
    ).to(device)
    return lambda logits, target: loss(logits, target.unsqueeze(1))


def _check_masks(masks: Tensor, num_classes: int, where: str) -> None:
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"{where} masks must be [N, S, S], got {tuple(masks.shape)}")
    lo, hi = int(masks.min()), int(masks.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{where} masks hold values {lo}..{hi}; expected 0..{num_classes - 1} (0 = background)")


def train_decoder(
    patches: Tensor,
    grid: tuple[int, int],
    masks: Tensor,
    num_classes: int,
    *,
    epochs: int = 5,
    lr: float = 5e-4,
    batch_size: int = 16,
    hidden: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[SegmentationDecoder, float]:
    """Train a decoder on cached patches [N, P, D] and masks [N, S, S]; returns it and the last epoch's loss."""
    _check_masks(masks, num_classes, "train")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be ≥ 1, got epochs={epochs}, batch_size={batch_size}")
    if patches.shape[0] != masks.shape[0]:
        raise ValueError(f"{patches.shape[0]} patch sets for {masks.shape[0]} masks")
    device = torch.device(device)
    x = patches_to_grid(patches, grid)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        decoder = SegmentationDecoder(x.shape[1], num_classes, grid, masks.shape[-1], hidden).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr)
    loss_fn = _loss_fn(masks, num_classes, device)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    last = math.nan
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = decoder(x[idx].to(device))
            loss = loss_fn(logits, masks[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / count
    decoder.eval()
    return decoder, last


@torch.no_grad()
def predict(
    decoder: SegmentationDecoder, patches: Tensor, grid: tuple[int, int], batch_size: int = 32, device="cpu"
) -> Tensor:
    """Argmax label maps [N, S, S] (CPU) for cached patches."""
    x = patches_to_grid(patches, grid)
    was_training = decoder.training
    decoder.eval()
    out = [decoder(x[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, x.shape[0], batch_size)]
    decoder.train(was_training)
    return torch.cat(out)


def run_segmentation(
    train_patches: Tensor,
    train_masks: Tensor,
    test_patches: Tensor,
    test_masks: Tensor,
    grid: tuple[int, int],
    class_names: Sequence[str],
    *,
    epochs: int = 5,
    lr: float = 5e-4,
    batch_size: int = 16,
    hidden: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SegmentationResult:
    """Train the decoder on the train split's cached patches and report Dice on the test split."""
    if not class_names:
        raise ValueError("run_segmentation: class_names is empty")
    num_classes = len(class_names) + 1
    _check_masks(test_masks, num_classes, "test")
    decoder, last = train_decoder(
        train_patches,
        grid,
        train_masks,
        num_classes,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        hidden=hidden,
        seed=seed,
        device=device,
    )
    pred = predict(decoder, test_patches, grid, device=device)
    dice, present = dice_scores(pred, test_masks, num_classes)
    per_class = {name: float(dice[:, j].mean()) for j, name in enumerate(class_names)}
    positive = {
        name: float(dice[present[:, j], j].mean()) if bool(present[:, j].any()) else math.nan
        for j, name in enumerate(class_names)
    }
    return SegmentationResult(
        class_names=list(class_names),
        dice=per_class,
        dice_positive=positive,
        mean_dice=float(sum(per_class.values()) / len(per_class)),
        mean_dice_positive=macro_mean(list(positive.values())),
        epochs=epochs,
        final_train_loss=last,
        n_train=int(train_patches.shape[0]),
        n_test=int(test_patches.shape[0]),
    )
