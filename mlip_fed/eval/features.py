"""Frozen-encoder feature extraction shared by every evaluator.

Every downstream evaluator sits on a *frozen* encoder, so the encoder runs once per split and the
heads (linear probe, retrieval, zero-shot, segmentation decoder) work on cached tensors. That keeps
the per-round evaluation the federated server runs cheap: one forward pass over the test split,
however many metrics are computed from it.

The evaluators never depend on how the encoder was trained: they only need the small protocol
below (``encode_image`` / ``encode_text``), which the MLIP module implements and tests fake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, Protocol, TypedDict, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES


class ImageOutputLike(Protocol):
    """What ``encode_image`` returns: pre-projection pooled features, projected global and patch embeddings."""

    pooled: Tensor  # [B, Dv], pre-projection (what the linear probe reads)
    embedding: Tensor  # [B, D], L2-normalised
    patches: Tensor  # [B, P, D], L2-normalised, P = h * w
    grid: tuple[int, int]  # (h, w) of the patch grid


class TextOutputLike(Protocol):
    """What ``encode_text`` returns; only the global embedding is used for evaluation."""

    embedding: Tensor  # [B, D], L2-normalised


@runtime_checkable
class ImageTextEncoder(Protocol):
    """The part of the MLIP module that evaluation relies on."""

    training: bool

    def encode_image(self, images: Tensor) -> ImageOutputLike: ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextOutputLike: ...

    def train(self, mode: bool = True) -> Any: ...


class Tokenizer(Protocol):
    """An HF ``BertTokenizerFast``-like callable (the project's shared tokenizer satisfies it)."""

    def __call__(
        self,
        text: list[str],
        *,
        padding: bool | str,
        truncation: bool,
        max_length: int,
        return_tensors: str,
    ) -> Mapping[str, Tensor]: ...


class FeatureSet(TypedDict):
    """Cached outputs of the frozen encoder over one split, in dataset order (all tensors on CPU)."""

    pooled: Tensor  # [N, Dv]
    embedding: Tensor  # [N, D]
    labels: Tensor  # [N, 14] raw CheXpert labels (1 / 0 / -1 / NaN)
    reports: list[str]
    text_embedding: NotRequired[Tensor]  # [N, D], only when a tokenizer was given
    patches: NotRequired[Tensor]  # [N, P, D], only when with_patches
    grid: NotRequired[tuple[int, int]]
    masks: NotRequired[Tensor]  # [N, S, S] long, only when with_masks


def _collate(items: list[dict[str, Any] | None], *, with_masks: bool) -> dict[str, Any] | None:
    """Stack a batch, naming the offending item when the dataset breaks the item contract.

    ``None`` items are records the dataset could not decode; it counts them in its own SkipReport,
    so they are dropped here (features then cover fewer rows than ``len(dataset)``, all aligned).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    for key in ("image", "report", "labels", *(("mask",) if with_masks else ())):
        for item in items:
            if key not in item:
                raise KeyError(f"dataset item is missing {key!r} (has {sorted(item)}); evaluation needs it")
    labels = torch.stack([torch.as_tensor(item["labels"], dtype=torch.float32) for item in items])
    if labels.shape[1] != len(CHEXPERT_CATEGORIES):
        raise ValueError(f"dataset item 'labels' has {labels.shape[1]} entries, expected {len(CHEXPERT_CATEGORIES)}")
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]),
        "report": [str(item["report"]) for item in items],
        "labels": labels,
    }
    if with_masks:
        batch["mask"] = torch.stack([torch.as_tensor(item["mask"]).long() for item in items])
    return batch


def encode_texts(
    model: ImageTextEncoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    device: torch.device | str,
    *,
    max_length: int = 128,
    batch_size: int = 64,
) -> Tensor:
    """L2-normalised text embeddings [N, D] on CPU; the caller is responsible for ``no_grad`` / eval mode."""
    if not texts:
        raise ValueError("encode_texts: no texts to encode")
    out: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        tokens = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        emb = model.encode_text(ids, mask).embedding
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def extract_features(
    model: ImageTextEncoder,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    *,
    tokenizer: Tokenizer | None = None,
    max_length: int = 128,
    with_patches: bool = False,
    with_masks: bool = False,
    progress: bool = False,
) -> FeatureSet:
    """Run the frozen encoder once over ``dataset`` and cache what the evaluators need.

    ``progress``: a progress bar over the batches when stderr is a terminal (``mlip-eval``, a site's evaluation
    round); silent in logs, pipes and simulation actors.

    The model must already live on ``device``. It is put in eval mode (dropout and batch-norm
    statistics must not change the features) and its previous mode is restored afterwards, because
    the federated server evaluates between training rounds on the very module it keeps training.
    Order is the dataset's order (no shuffling, no worker processes), so results are deterministic.
    Patches are only kept when asked: at 224² they cost ~100 kB per image.
    """
    if batch_size <= 0:
        raise ValueError(f"extract_features: batch_size must be positive, got {batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("extract_features: dataset is empty")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        collate_fn=lambda items: _collate(items, with_masks=with_masks),
    )
    was_training = model.training
    model.train(False)
    pooled, embedding, labels, patches, masks, texts = [], [], [], [], [], []
    reports: list[str] = []
    grid: tuple[int, int] | None = None
    try:
        for batch in tqdm(loader, desc="features", unit="batch", disable=None if progress else True):
            if batch is None:
                continue
            out = model.encode_image(batch["image"].to(device).float())
            pooled.append(out.pooled.float().cpu())
            embedding.append(torch.nn.functional.normalize(out.embedding.float(), dim=-1).cpu())
            labels.append(batch["labels"])
            reports.extend(batch["report"])
            if with_patches:
                patches.append(out.patches.float().cpu())
                grid = (int(out.grid[0]), int(out.grid[1]))
            if with_masks:
                masks.append(batch["mask"])
            if tokenizer is not None:
                texts.append(
                    encode_texts(
                        model, tokenizer, batch["report"], device, max_length=max_length, batch_size=batch_size
                    )
                )
    finally:
        model.train(was_training)
    if not pooled:
        raise ValueError("extract_features: every item of the dataset was skipped as undecodable")
    features: FeatureSet = {
        "pooled": torch.cat(pooled),
        "embedding": torch.cat(embedding),
        "labels": torch.cat(labels),
        "reports": reports,
    }
    if tokenizer is not None:
        features["text_embedding"] = torch.cat(texts)
    if with_patches:
        assert grid is not None
        features["patches"] = torch.cat(patches)
        features["grid"] = grid
        if features["patches"].shape[1] != grid[0] * grid[1]:
            raise ValueError(f"encoder returned {features['patches'].shape[1]} patches for grid {grid}")
    if with_masks:
        features["masks"] = torch.cat(masks)
    return features
