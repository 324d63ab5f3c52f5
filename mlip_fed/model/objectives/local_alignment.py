"""Token-knowledge-patch local alignment (docs/method.md, "local" rows).

Word tokens are enriched with the knowledge tokens of the entities found in the report
(span-aligned addition: every word inside entity e's span gets k_e added, then is re-normalised),
then aligned to image patches with MGCA's parameter-free bidirectional attention alignment,
weighted by token importance. A knowledge->patch term lets each entity's knowledge token attend
over the patches and be contrasted against the other entities of the same study.

All contrasts are within one study (negatives = other words / patches / entities of the same
sample), so this objective couples no records across the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MASKED = -1e4  # finite, so fully masked rows never produce NaN (also safe in fp16)


def fuse_knowledge(
    words: torch.Tensor, knowledge: torch.Tensor, entity_mask: torch.Tensor, entity_words: torch.Tensor
) -> torch.Tensor:
    """w~_m = normalize(w_m + sum_e [m in span(e)] k_e). words [B,M,d], knowledge [B,E,d], entity_words [B,E,M]."""
    span = (entity_words & entity_mask.unsqueeze(-1)).to(words.dtype)  # [B, E, M]
    return F.normalize(words + torch.einsum("bem,bed->bmd", span, knowledge.to(words.dtype)), dim=-1)


def attend(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """normalize(softmax_k(q.k/tau) k): each query summarised by the keys it attends to."""
    logits = queries @ keys.transpose(1, 2) / temperature
    logits = logits.masked_fill(~key_mask.unsqueeze(1), _MASKED)
    return F.normalize(torch.softmax(logits, dim=-1) @ keys, dim=-1)


def weighted_self_contrast(
    queries: torch.Tensor, summaries: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per sample: ½ sum_m weight_m [CE_row(m) + CE_col(m)] over the MxM matrix q_m . s_m' / tau. Returns [B]."""
    sim = queries @ summaries.transpose(1, 2) / temperature  # [B, M, M]
    pair_mask = mask.unsqueeze(1) & mask.unsqueeze(2)
    sim = sim.masked_fill(~pair_mask, _MASKED)
    diag_row = torch.diagonal(F.log_softmax(sim, dim=2), dim1=1, dim2=2)  # log p(s_m | q_m)
    diag_col = torch.diagonal(F.log_softmax(sim, dim=1), dim1=1, dim2=2)  # log p(q_m | s_m)
    per_item = -(diag_row + diag_col) / 2
    per_item = torch.where(mask, per_item, torch.zeros_like(per_item))
    return (weights.to(per_item.dtype) * per_item).sum(dim=1)


def local_alignment_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    word_weights: torch.Tensor,
    patches: torch.Tensor,
    patch_weights: torch.Tensor,
    temperature: float = 0.1,
    *,
    bidirectional: bool = True,
    knowledge: torch.Tensor | None = None,
    entity_mask: torch.Tensor | None = None,
    entity_words: torch.Tensor | None = None,
    knowledge_patch_weight: float = 1.0,
    group_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Returns the parts ``word`` (word->patch), ``patch`` (patch->word, if bidirectional), ``knowledge_patch``.

    All embeddings L2-normalised. ``word_weights`` and ``patch_weights`` sum to 1 over valid items per sample.
    Every term is per-sample; only the knowledge-patch reduction (mean over samples that have entities) couples
    the batch. With ``group_ids`` (DP buckets) it becomes a sum over those samples divided by B, so the batch
    loss is ``sum_g (n_g / B) * loss(group g alone)`` like every other objective.
    """
    if knowledge is not None:
        if entity_mask is None or entity_words is None:
            raise ValueError("local alignment: knowledge tokens need entity_mask and entity_words")
        if entity_words.shape[2] < words.shape[1]:  # spans over the first words only: the rest belong to no entity
            entity_words = F.pad(entity_words, (0, words.shape[1] - entity_words.shape[2]))
        if entity_words.shape[2] != words.shape[1]:
            raise ValueError(
                f"local alignment: entity spans cover {entity_words.shape[2]} words but the text has {words.shape[1]}"
            )
        words = fuse_knowledge(words, knowledge, entity_mask, entity_words)
    patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    parts: dict[str, torch.Tensor] = {}
    words_hat = attend(words, patches, patch_mask, temperature)
    parts["word"] = weighted_self_contrast(words, words_hat, word_mask, word_weights, temperature).mean()
    if bidirectional:
        patches_hat = attend(patches, words, word_mask, temperature)
        parts["patch"] = weighted_self_contrast(patches, patches_hat, patch_mask, patch_weights, temperature).mean()
    if knowledge is not None and knowledge_patch_weight > 0:
        assert entity_mask is not None
        k = knowledge.to(patches.dtype)
        k_hat = attend(k, patches, patch_mask, temperature)
        n_entities = entity_mask.sum(dim=1)
        uniform = entity_mask.to(k.dtype) / n_entities.clamp(min=1).unsqueeze(1).to(k.dtype)
        per_sample = weighted_self_contrast(k, k_hat, entity_mask, uniform, temperature)
        has = (n_entities > 0).to(per_sample.dtype)
        denominator = has.sum().clamp(min=1) if group_ids is None else has.new_tensor(float(has.shape[0]))
        parts["knowledge_patch"] = knowledge_patch_weight * (per_sample * has).sum() / denominator
    return parts


class LocalAlignment(nn.Module):
    """Parameter-free loss module; the knowledge tokens arrive already projected by the local text head."""

    def __init__(self, temperature: float, bidirectional: bool, knowledge_patch_weight: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.bidirectional = bidirectional
        self.knowledge_patch_weight = knowledge_patch_weight

    def forward(self, **inputs: torch.Tensor | None) -> torch.Tensor:
        parts = local_alignment_loss(
            temperature=self.temperature,
            bidirectional=self.bidirectional,
            knowledge_patch_weight=self.knowledge_patch_weight,
            **inputs,  # type: ignore[arg-type]
        )
        return sum(parts.values())  # type: ignore[return-value]
