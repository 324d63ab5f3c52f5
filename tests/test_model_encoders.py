"""Image and text towers on their own: shapes, local weight loading, word merging, importance weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlip_fed.model.config import ImageEncoderConfig
from mlip_fed.model.image_encoder import build_image_encoder
from mlip_fed.model.text_encoder import clipped_importance, merge_word_pieces


@pytest.mark.parametrize("arch,grid,pooled", [("vit_tiny", (8, 8), 128), ("resnet_tiny", (8, 8), 128)])
def test_tiny_towers_shapes(arch: str, grid: tuple[int, int], pooled: int) -> None:
    enc = build_image_encoder(ImageEncoderConfig(arch=arch))
    feats = enc(torch.randn(2, 1, 64, 64))
    assert feats.pooled.shape == (2, pooled)
    assert feats.grid == grid and feats.patches.shape[:2] == (2, grid[0] * grid[1])
    assert torch.allclose(feats.patch_weights.sum(dim=1), torch.ones(2), atol=1e-5)


def test_pretrained_path_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny"))
    path = tmp_path / "w.pt"
    torch.save(enc.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_image_encoder(ImageEncoderConfig(arch="resnet_tiny", pretrained_path=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), loaded.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="does not"):
        build_image_encoder(ImageEncoderConfig(arch="vit_tiny", pretrained_path=str(path)))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_image_encoder(ImageEncoderConfig(pretrained_path=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="divisible"):
        ImageEncoderConfig(image_size=64, patch_size=7)


def test_merge_word_pieces_sums_pieces() -> None:
    tokens = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    word_ids = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    words, mask = merge_word_pieces(tokens, word_ids)
    assert torch.equal(words, torch.tensor([[[2.0 + 4.0, 3.0 + 5.0], [6.0, 7.0]]]))
    assert mask.tolist() == [[True, True]]


def test_clipped_importance_hand_value() -> None:
    weights = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    out = clipped_importance(weights, mask)
    # quantiles over the five real words: 10% = 0.4, 90% = 3.6 -> (0.4, 1, 2, 3, 3.6) / 10
    assert torch.allclose(out, torch.tensor([[0.04, 0.1, 0.2, 0.3, 0.36, 0.0]]), atol=1e-6)
