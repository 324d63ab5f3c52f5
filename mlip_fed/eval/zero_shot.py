"""Zero-shot classification from knowledge-base prompts, with no trained head at all.

Per class, the knowledge base holds positive prompts ("there is a left pleural effusion") and
negative prompts ("no pleural effusion"). Each set is encoded by the text tower, L2-normalised,
averaged and re-normalised (CheXzero's scheme). The class score of an image is

    s = cos(img, mean positive prompt) − cos(img, mean negative prompt)

CheXzero reports softmax(s_pos, s_neg)[0] = sigmoid(s_pos − s_neg); that is a monotone function
of ``s``, so AUROC is identical and the plain difference is kept. Because the prompts come from the
shared knowledge base, every site and the server score the same classes with the same text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mlip_fed.eval.features import ImageTextEncoder, Tokenizer, encode_texts
from mlip_fed.eval.linear_probe import (
    NanFloat,
    UncertaintyPolicy,
    binarize_labels,
    binary_auroc,
    class_indices,
    macro_mean,
)
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, KnowledgeBase, load_knowledge_base


class ZeroShotResult(BaseModel):
    """Per-class and macro AUROC of prompt scores; argmax accuracy on single-positive images."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str]
    policy: str
    macro_auroc: NanFloat
    per_class: dict[str, NanFloat]
    #: Multi-class accuracy (5×200 style): argmax of ``s`` over classes, on test images with exactly
    #: one positive among ``classes``; NaN when there are none.
    accuracy: NanFloat
    n_accuracy: int
    skipped: dict[str, str] = {}


@torch.no_grad()
def class_prompt_embeddings(
    model: ImageTextEncoder,
    tokenizer: Tokenizer,
    classes: Sequence[str],
    device: torch.device | str,
    *,
    kb: KnowledgeBase | None = None,
    max_length: int = 128,
) -> tuple[Tensor, Tensor]:
    """Mean positive and mean negative prompt embeddings, each [C, D] and L2-normalised (CPU)."""
    kb = kb if kb is not None else load_knowledge_base()
    missing = [c for c in classes if not kb.prompts_positive.get(c) or not kb.prompts_negative.get(c)]
    if missing:
        raise ValueError(f"knowledge base {kb.version} lacks positive or negative prompts for {missing}")
    was_training = model.training
    model.train(False)
    try:
        pos, neg = [], []
        for name in classes:
            for prompts, out in ((kb.prompts_positive[name], pos), (kb.prompts_negative[name], neg)):
                emb = encode_texts(model, tokenizer, list(prompts), device, max_length=max_length)
                out.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    finally:
        model.train(was_training)
    return torch.stack(pos), torch.stack(neg)


def zero_shot_scores(image_embedding: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """Scores [N, C] = cos(img, pos_c) − cos(img, neg_c); every input is re-normalised."""
    if positive.shape != negative.shape or image_embedding.shape[-1] != positive.shape[-1]:
        raise ValueError(
            f"shape mismatch: images {tuple(image_embedding.shape)}, positive {tuple(positive.shape)}, "
            f"negative {tuple(negative.shape)}"
        )
    img = torch.nn.functional.normalize(image_embedding.float(), dim=-1)
    pos = torch.nn.functional.normalize(positive.float(), dim=-1)
    neg = torch.nn.functional.normalize(negative.float(), dim=-1)
    return img @ pos.T - img @ neg.T


def score_zero_shot(
    scores: Tensor, labels: Tensor, classes: Sequence[str], policy: UncertaintyPolicy = "u_ones"
) -> ZeroShotResult:
    """AUROC per class (NaN when the test labels are single-class) and argmax accuracy."""
    if scores.shape != (labels.shape[0], len(classes)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {labels.shape[0]} images × {len(classes)} classes")
    y = binarize_labels(labels, policy)[:, class_indices(classes)]
    per_class: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for j, name in enumerate(classes):
        per_class[name] = binary_auroc(scores[:, j], y[:, j])
        if math.isnan(per_class[name]):
            skipped[name] = f"test split has only label {int(y[0, j])}"
    single = y.sum(1) == 1
    n_acc = int(single.sum())
    accuracy = (
        float((scores[single].argmax(1) == y[single].argmax(1)).float().mean())
        if n_acc and len(classes) > 1
        else math.nan
    )
    return ZeroShotResult(
        classes=list(classes),
        policy=policy,
        macro_auroc=macro_mean(list(per_class.values())),
        per_class=per_class,
        accuracy=accuracy,
        n_accuracy=n_acc if len(classes) > 1 else 0,
        skipped=skipped,
    )


def run_zero_shot(
    model: ImageTextEncoder,
    tokenizer: Tokenizer,
    image_embedding: Tensor,
    labels: Tensor,
    device: torch.device | str,
    *,
    classes: Sequence[str] | None = None,
    kb: KnowledgeBase | None = None,
    policy: UncertaintyPolicy = "u_ones",
    max_length: int = 128,
) -> ZeroShotResult:
    """Zero-shot AUROC on cached test image embeddings; ``classes`` defaults to every class with prompts."""
    kb = kb if kb is not None else load_knowledge_base()
    if classes is None:
        classes = [c for c in CHEXPERT_CATEGORIES if kb.prompts_positive.get(c) and kb.prompts_negative.get(c)]
        if not classes:
            raise ValueError(f"knowledge base {kb.version} has no class with both positive and negative prompts")
    pos, neg = class_prompt_embeddings(model, tokenizer, classes, device, kb=kb, max_length=max_length)
    return score_zero_shot(zero_shot_scores(image_embedding, pos, neg), labels, classes, policy)
