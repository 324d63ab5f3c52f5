"""Segmentation: Dice by hand, the decoder's shapes, and training on a trivially learnable toy task."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_fed.eval.segmentation import (
    SegmentationDecoder,
    class_weights,
    dice_scores,
    patches_to_grid,
    predict,
    run_segmentation,
    train_decoder,
)


def test_dice_perfect_and_empty() -> None:
    target = torch.tensor([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
    dice, present = dice_scores(target.clone(), target, num_classes=3)
    assert torch.equal(dice, torch.ones(2, 2, dtype=torch.float64))  # image 2: empty/empty = 1
    assert present.tolist() == [[True, True], [False, False]]


def test_dice_by_hand() -> None:
    target = torch.tensor([[[1, 1, 1], [0, 2, 0], [0, 0, 0]]])
    pred = torch.tensor([[[1, 0, 0], [1, 0, 0], [0, 0, 2]]])
    dice, _ = dice_scores(pred, target, num_classes=3)
    # class 1: |P|=2, |G|=3, |P∩G|=1 → 2/5; class 2: |P|=1, |G|=1, no overlap → 0.
    assert dice[0].tolist() == pytest.approx([0.4, 0.0])


def test_decoder_output_size_and_patch_order() -> None:
    dec = SegmentationDecoder(in_channels=8, num_classes=3, grid=(3, 3), out_size=20)
    assert dec(torch.randn(2, 8, 3, 3)).shape == (2, 3, 20, 20)
    patches = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    grid = patches_to_grid(patches, (2, 3))
    assert grid[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]  # row-major
    with pytest.raises(ValueError, match="grid"):
        patches_to_grid(patches, (2, 2))


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid 2×2 of patch features; feature k is on iff the patch's 4×4 block is class k (k = 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, 2, 2), generator=g)  # per-patch class
    feats = torch.nn.functional.one_hot(labels, 3).float() + 0.05 * torch.randn(n, 2, 2, 3, generator=g)
    masks = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [n, 8, 8]
    return feats.reshape(n, 4, 3), masks


def test_decoder_learns_toy_task_deterministically() -> None:
    torch.set_num_threads(1)
    x_tr, m_tr = _toy(48, seed=0)
    x_te, m_te = _toy(16, seed=1)
    kw = dict(epochs=25, lr=1e-2, batch_size=16, hidden=16, seed=3)
    res = run_segmentation(x_tr, m_tr, x_te, m_te, (2, 2), ["a", "b"], **kw)
    assert res.mean_dice > 0.9 and res.mean_dice_positive > 0.9
    assert set(res.dice) == {"a", "b"} and res.n_train == 48 and res.n_test == 16
    again = run_segmentation(x_tr, m_tr, x_te, m_te, (2, 2), ["a", "b"], **kw)
    assert again == res
    untrained = run_segmentation(x_tr, m_tr, x_te, m_te, (2, 2), ["a", "b"], **{**kw, "epochs": 1, "lr": 1e-6})
    assert untrained.mean_dice < res.mean_dice - 0.2


def test_bad_masks_are_named() -> None:
    x, m = _toy(4, seed=0)
    with pytest.raises(ValueError, match=r"test masks hold values 0..2; expected 0..1"):
        run_segmentation(x, m, x, m, (2, 2), ["only_one"])
    res_nan = run_segmentation(x, torch.zeros_like(m), x, torch.zeros_like(m), (2, 2), ["a", "b"], epochs=1, hidden=8)
    assert math.isnan(res_nan.mean_dice_positive) and res_nan.mean_dice <= 1.0


def _sparse(n: int, seed: int, classes: int = 3, signal: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid 4×4, masks 16×16: one patch per image holds a finding (1/16 of the pixels); its feature is on, in noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, 4, 4, dtype=torch.long)
    labels.view(n, 16)[torch.arange(n), torch.randint(0, 16, (n,), generator=g)] = torch.randint(
        1, classes + 1, (n,), generator=g
    )
    feats = signal * torch.nn.functional.one_hot(labels, classes + 1).float()
    feats = feats + torch.randn(n, 4, 4, classes + 1, generator=g)
    return feats.reshape(n, 16, classes + 1), labels.repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_sparse_findings_are_predicted_not_painted_over_with_background() -> None:
    """Findings on a few per cent of the pixels: the probe predicts them (an unweighted loss predicted none)."""
    torch.set_num_threads(1)
    (x_tr, m_tr), (x_te, m_te) = _sparse(64, seed=0), _sparse(32, seed=1)
    kw = dict(epochs=10, lr=5e-3, batch_size=16, hidden=16, seed=0)
    res = run_segmentation(x_tr, m_tr, x_te, m_te, (4, 4), ["a", "b", "c"], **kw)
    assert res.mean_dice_positive > 0.05
    decoder, _ = train_decoder(x_tr, (4, 4), m_tr, 4, **kw)
    assert (predict(decoder, x_te, (4, 4)) > 0).any()


def test_class_weights_balance_by_the_square_root_of_rarity() -> None:
    masks = torch.zeros(1, 10, 10, dtype=torch.long)
    masks[0, 0, :4] = 1  # 4 pixels of class 1 against 96 of background
    weights = class_weights(masks, num_classes=3)
    assert weights.tolist() == pytest.approx([1.0, math.sqrt(96 / 4), 1.0])  # class 2 absent: neutral
