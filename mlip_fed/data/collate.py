"""Batch dataset items for MLIPModel: tokens, knowledge-entity spans and counterfactual reports.

Word indices follow the text tower's rule (a token starting with ``##`` continues the previous
word; special tokens and padding belong to no word), so the entity spans built here line up with
the words the model merges. Counterfactuals are seeded per (seed, epoch, study), so a batch is
the same whatever the worker layout or resume point.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mlip_fed.knowledge.kb import KnowledgeBase, load_knowledge_base
from mlip_fed.knowledge.mentions import Mention
from mlip_fed.model.objectives.text_swap import make_counterfactual

MentionFn = Callable[[str], Sequence[Mention]]


def token_word_ids(
    tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Word index per token, -1 for special tokens and padding (same rule as ``TextEncoder.word_ids``)."""
    special = set(tokenizer.all_special_ids)
    out = torch.full_like(input_ids, -1)
    for row in range(input_ids.shape[0]):
        tokens = tokenizer.convert_ids_to_tokens(input_ids[row].tolist())
        word = -1
        for col, (tid, tok) in enumerate(zip(input_ids[row].tolist(), tokens, strict=True)):
            if not attention_mask[row, col] or tid in special:
                continue
            if not tok.startswith("##") or word < 0:
                word += 1
            out[row, col] = word
    return out


class MLIPCollator:
    """Callable ``collate_fn``. Items: ``image`` [1,S,S], optional ``image_view2``, ``report``, ``labels`` [14],
    ``patient_id``, ``study_id``. ``None`` items (undecodable images) are dropped.

    Output keys: image, (image_view2), input_ids, attention_mask, labels, word_ids, entity_ids, entity_mask,
    entity_words, swap_input_ids, swap_attention_mask, swap_valid, patient_id, study_id, (index).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        kb: KnowledgeBase | None = None,
        max_length: int = 128,
        swap_prob: float = 0.5,
        seed: int = 0,
        *,
        max_entities: int = 8,
        max_edits: int = 1,
        mention_fn: MentionFn | None = None,
        cache_size: int = 50_000,
    ) -> None:
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob must be in [0, 1], got {swap_prob}")
        self.tokenizer = tokenizer
        self.kb = kb or load_knowledge_base()
        self.max_length = max_length
        self.swap_prob = swap_prob
        self.seed = seed
        self.epoch = 0
        self.max_entities = max_entities
        self.max_edits = max_edits
        self.concept_index = {c.id: i for i, c in enumerate(self.kb.concepts)}
        self.findings = [
            (c.chexpert_category, c.name.lower())
            for c in self.kb.by_group("finding")
            if c.chexpert_category not in (None, "No Finding")
        ]
        self._mention_fn = mention_fn
        self._cache: dict[str, list[Mention]] = {}
        self._cache_size = cache_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mentions(self, text: str) -> list[Mention]:
        """Labeler mentions, cached by text (templated reports repeat a lot)."""
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        if self._mention_fn is None:
            from mlip_fed.knowledge.labeler import extract_mentions

            kb = self.kb
            self._mention_fn = lambda t: extract_mentions(t, kb)
        found = list(self._mention_fn(text))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[text] = found
        return found

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("MLIPCollator: every item in the batch was None (all images failed to decode)")
        reports = [str(it["report"]) for it in items]
        batch: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
        n_view2 = sum("image_view2" in it for it in items)
        if n_view2 == len(items):
            batch["image_view2"] = torch.stack([it["image_view2"] for it in items])
        elif n_view2:
            raise ValueError(f"MLIPCollator: only {n_view2} of {len(items)} items carry 'image_view2'")
        enc = self._tokenize(reports)
        batch["input_ids"] = enc["input_ids"]
        batch["attention_mask"] = enc["attention_mask"]
        word_ids = token_word_ids(self.tokenizer, enc["input_ids"], enc["attention_mask"])
        batch["word_ids"] = word_ids
        batch["labels"] = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
        mentions = [self.mentions(r) for r in reports]
        batch.update(self._entities(mentions, enc["offset_mapping"], word_ids))
        batch.update(self._swaps(items, reports, mentions))
        batch["patient_id"] = [str(it["patient_id"]) for it in items]
        batch["study_id"] = [str(it["study_id"]) for it in items]
        if all("index" in it for it in items):
            batch["index"] = torch.tensor([int(it["index"]) for it in items])
        return batch

    def _entities(
        self, mentions: list[list[Mention]], offsets: torch.Tensor, word_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        num_words = max(int(word_ids.max().item()) + 1, 1)
        per_row: list[list[tuple[int, set[int]]]] = []
        for row, found in enumerate(mentions):
            entities: dict[int, set[int]] = {}
            for m in found:
                idx = self.concept_index.get(m.concept_id)
                if idx is None:
                    raise KeyError(f"mention concept {m.concept_id!r} is not in knowledge base {self.kb.version}")
                starts, ends = offsets[row, :, 0], offsets[row, :, 1]
                hit = (starts < m.end) & (ends > m.start) & (word_ids[row] >= 0)
                words = set(word_ids[row][hit].tolist())
                if not words:  # truncated away
                    continue
                if idx not in entities and len(entities) >= self.max_entities:
                    continue
                entities.setdefault(idx, set()).update(words)
            per_row.append(list(entities.items()))
        e_max = max(1, max(len(r) for r in per_row))
        b = len(mentions)
        entity_ids = torch.full((b, e_max), -1, dtype=torch.long)
        entity_words = torch.zeros((b, e_max, num_words), dtype=torch.bool)
        for row, entities in enumerate(per_row):
            for e, (idx, words) in enumerate(entities):
                entity_ids[row, e] = idx
                entity_words[row, e, sorted(words)] = True
        return {"entity_ids": entity_ids, "entity_mask": entity_ids >= 0, "entity_words": entity_words}

    def _swaps(
        self, items: Sequence[dict[str, Any]], reports: list[str], mentions: list[list[Mention]]
    ) -> dict[str, torch.Tensor]:
        swapped: list[str] = []
        valid: list[bool] = []
        for item, report, found in zip(items, reports, mentions, strict=True):
            rng = random.Random(f"{self.seed}:{self.epoch}:{item['study_id']}")
            cf = None
            if self.swap_prob > 0 and rng.random() < self.swap_prob:
                cf = make_counterfactual(report, found, rng, findings=self.findings, max_edits=self.max_edits)
            swapped.append(cf if cf is not None else report)
            valid.append(cf is not None)
        enc = self._tokenize(swapped)
        return {
            "swap_input_ids": enc["input_ids"],
            "swap_attention_mask": enc["attention_mask"],
            "swap_valid": torch.tensor(valid, dtype=torch.bool),
        }
