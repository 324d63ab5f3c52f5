"""Feature extraction on a tiny fake encoder; the fakes here are reused by the other eval tests."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mlip_fed.eval.features import ImageTextEncoder, extract_features
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES

CARDIO = CHEXPERT_CATEGORIES.index("Cardiomegaly")
NO_FINDING = CHEXPERT_CATEGORIES.index("No Finding")


@dataclass
class FakeImageOutput:
    pooled: Tensor
    embedding: Tensor
    patches: Tensor
    grid: tuple[int, int]


@dataclass
class FakeTextOutput:
    embedding: Tensor


class FakeEncoder(nn.Module):
    """A fixed random conv + linear image tower and a bag-of-tokens text tower (128-d like MLIP)."""

    def __init__(self, patch: int = 4, width: int = 16, dim: int = 128, vocab: int = 512, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        self.proj = nn.Linear(width, dim)
        self.patch_proj = nn.Linear(width, dim)
        self.tokens = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.dropout = nn.Dropout(0.5)  # makes eval mode observable: features differ in train mode

    def encode_image(self, images: Tensor) -> FakeImageOutput:
        fmap = torch.relu(self.conv(images))  # [B, W, h, w]
        h, w = fmap.shape[-2:]
        pooled = self.dropout(fmap.mean((2, 3)))
        tokens = fmap.flatten(2).transpose(1, 2)  # row-major patches
        return FakeImageOutput(
            pooled=pooled,
            embedding=nn.functional.normalize(self.proj(pooled), dim=-1),
            patches=nn.functional.normalize(self.patch_proj(tokens), dim=-1),
            grid=(h, w),
        )

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> FakeTextOutput:
        weights = attention_mask.float()
        return FakeTextOutput(
            embedding=nn.functional.normalize(self.tokens(input_ids, per_sample_weights=weights), dim=-1)
        )


class FakeTokenizer:
    """Whitespace tokens hashed (crc32, stable across runs) into a small vocabulary; HF call signature."""

    def __init__(self, vocab: int = 512) -> None:
        self.vocab = vocab

    def __call__(self, text, *, padding, truncation, max_length, return_tensors):
        assert return_tensors == "pt" and padding and truncation
        ids = [
            [1 + zlib.crc32(t.encode()) % (self.vocab - 1) for t in s.lower().split()][:max_length] or [1] for s in text
        ]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class ToyCXR(Dataset):
    """Images with a bright square (≙ Cardiomegaly) in a random patch; mask 1 marks the square."""

    def __init__(self, n: int, size: int = 16, seed: int = 0, with_mask: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = 0.1 * torch.randn(1, size, size, generator=g)
            mask = torch.zeros(size, size, dtype=torch.long)
            labels = torch.full((len(CHEXPERT_CATEGORIES),), math.nan)
            positive = bool(torch.rand((), generator=g) < 0.5)
            if positive:
                r, c = (torch.randint(0, size // 4, (2,), generator=g) * 4).tolist()
                image[0, r : r + 4, c : c + 4] += 2.0
                mask[r : r + 4, c : c + 4] = 1
            labels[CARDIO] = 1.0 if positive else 0.0
            labels[NO_FINDING] = 0.0 if positive else 1.0
            report = "the heart is enlarged cardiomegaly" if positive else "normal heart size no cardiomegaly"
            item = {"image": image, "report": report, "labels": labels}
            if with_mask:
                item["mask"] = mask
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_fake_encoder_satisfies_protocol() -> None:
    assert isinstance(FakeEncoder(), ImageTextEncoder)


def test_extract_features_shapes_order_and_determinism() -> None:
    torch.set_num_threads(1)
    model, ds = FakeEncoder(), ToyCXR(10)
    a = extract_features(
        model, ds, batch_size=3, device="cpu", tokenizer=FakeTokenizer(), with_patches=True, with_masks=True
    )
    b = extract_features(
        model, ds, batch_size=4, device="cpu", tokenizer=FakeTokenizer(), with_patches=True, with_masks=True
    )
    assert a["pooled"].shape == (10, 16) and a["embedding"].shape == (10, 128)
    assert a["patches"].shape == (10, 16, 128) and a["grid"] == (4, 4)
    assert a["text_embedding"].shape == (10, 128) and a["masks"].shape == (10, 16, 16)
    assert a["reports"] == [item["report"] for item in ds.items]
    torch.testing.assert_close(a["labels"], torch.stack([item["labels"] for item in ds.items]), equal_nan=True)
    torch.testing.assert_close(a["embedding"].norm(dim=1), torch.ones(10))
    # Eval mode (dropout off) and batch size do not change features.
    torch.testing.assert_close(a["pooled"], b["pooled"])
    torch.testing.assert_close(a["text_embedding"], b["text_embedding"])


def test_extract_features_restores_training_mode() -> None:
    model = FakeEncoder().train()
    extract_features(model, ToyCXR(4), batch_size=2, device="cpu")
    assert model.training
    model.eval()
    extract_features(model, ToyCXR(4), batch_size=2, device="cpu")
    assert not model.training


def test_extract_features_names_missing_field() -> None:
    with pytest.raises(KeyError, match="mask"):
        extract_features(FakeEncoder(), ToyCXR(3, with_mask=False), batch_size=2, device="cpu", with_masks=True)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(FakeEncoder(), ToyCXR(3), batch_size=0, device="cpu")


class _WithUndecodable(ToyCXR):
    """Item 1 is undecodable: the project's dataset returns None for it (and counts it itself)."""

    def __getitem__(self, i: int) -> dict | None:
        return None if i == 1 else self.items[i]


def test_undecodable_items_are_dropped_and_rows_stay_aligned() -> None:
    ds = _WithUndecodable(5)
    feats = extract_features(FakeEncoder(), ds, batch_size=2, device="cpu", tokenizer=FakeTokenizer())
    assert feats["pooled"].shape[0] == 4 and feats["text_embedding"].shape[0] == 4
    assert feats["reports"] == [ds.items[i]["report"] for i in (0, 2, 3, 4)]
    torch.testing.assert_close(
        feats["labels"], torch.stack([ds.items[i]["labels"] for i in (0, 2, 3, 4)]), equal_nan=True
    )
