"""Batch dataset items for MLIPModel: tokens, knowledge-entity spans and counterfactual reports.

Word indices follow the text tower's rule (a token starting with ``##`` continues the previous
word; special tokens and padding belong to no word), so the entity spans built here line up with
the words the model merges. Counterfactuals are seeded per (seed, epoch, study), so a batch is
the same whatever the worker layout or resume point.

Tokenisation, word indices and entity spans depend on a report's text only, so each distinct text is
encoded once and cached (``_TextEncoding``); a batch only pads the cached rows. Before the cache the
per-row Python loops of ``token_word_ids`` and ``_entities`` ran every step and cost ~180 ms per batch of
32 at the CPU default, about as much as decoding and augmenting the images (docs/federation.md,
"Performance fixes"). The output is identical to tokenising the batch with ``padding=True``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mlip_fed.data.shared_value import SharedInt
from mlip_fed.knowledge.counterfactual import make_counterfactual
from mlip_fed.knowledge.kb import KnowledgeBase, load_knowledge_base
from mlip_fed.knowledge.mentions import Mention

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


@dataclass(frozen=True)
class _TextEncoding:
    """One text, unpadded: token ids, word index per token and its knowledge entities ``(concept index, words)``
    (None until a report needs them: counterfactual texts never do)."""

    input_ids: tuple[int, ...]
    word_ids: tuple[int, ...]
    entities: tuple[tuple[int, frozenset[int]], ...] | None


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
        #: In shared memory: persistent loader workers collate with the epoch the trainer set (``set_epoch``).
        self._epoch = SharedInt(0)
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
        self._encodings: dict[str, _TextEncoding] = {}
        self._special = set(tokenizer.all_special_ids)
        if tokenizer.pad_token_id is None:
            raise ValueError("MLIPCollator: the tokenizer has no pad token; batches of reports need padding")
        if tokenizer.padding_side not in ("right", "left"):
            raise ValueError(f"MLIPCollator: unsupported tokenizer.padding_side={tokenizer.padding_side!r}")

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

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

    def encode_text(self, text: str, with_entities: bool = True) -> _TextEncoding:
        """The cached encoding of one text (entities only when asked: counterfactuals need none)."""
        hit = self._encodings.get(text)
        if hit is not None and (hit.entities is not None or not with_entities):
            return hit
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        word_ids: list[int] = []
        word = -1
        for tid, tok in zip(ids, tokens, strict=True):
            if tid in self._special:
                word_ids.append(-1)
                continue
            if not tok.startswith("##") or word < 0:
                word += 1
            word_ids.append(word)
        entities = self._entity_words(self.mentions(text), enc["offset_mapping"], word_ids) if with_entities else None
        encoding = _TextEncoding(tuple(ids), tuple(word_ids), entities)
        if len(self._encodings) >= self._cache_size:
            self._encodings.clear()
        self._encodings[text] = encoding
        return encoding

    def _entity_words(
        self, found: Sequence[Mention], offsets: Sequence[tuple[int, int]], word_ids: Sequence[int]
    ) -> tuple[tuple[int, frozenset[int]], ...]:
        """Concept index -> words it covers, first ``max_entities`` concepts in mention order."""
        entities: dict[int, set[int]] = {}
        for m in found:
            idx = self.concept_index.get(m.concept_id)
            if idx is None:
                raise KeyError(f"mention concept {m.concept_id!r} is not in knowledge base {self.kb.version}")
            words = {
                w
                for (start, end), w in zip(offsets, word_ids, strict=True)
                if w >= 0 and start < m.end and end > m.start
            }
            if not words:  # truncated away
                continue
            if idx not in entities and len(entities) >= self.max_entities:
                continue
            entities.setdefault(idx, set()).update(words)
        return tuple((idx, frozenset(words)) for idx, words in entities.items())

    def _pad(self, encodings: Sequence[_TextEncoding]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and word_ids padded to the longest row (as ``padding=True`` does)."""
        length = max(len(e.input_ids) for e in encodings)
        b = len(encodings)
        input_ids = torch.full((b, length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        word_ids = torch.full((b, length), -1, dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, e in enumerate(encodings):
            n = len(e.input_ids)
            cols = slice(length - n, length) if left else slice(0, n)
            input_ids[row, cols] = torch.tensor(e.input_ids, dtype=torch.long)
            attention[row, cols] = 1
            word_ids[row, cols] = torch.tensor(e.word_ids, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "word_ids": word_ids}

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
        encodings = [self.encode_text(r) for r in reports]
        batch.update(self._pad(encodings))
        batch["labels"] = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
        batch.update(self._entities(encodings, batch["word_ids"]))
        batch.update(self._swaps(items, reports, [self.mentions(r) for r in reports]))
        batch["patient_id"] = [str(it["patient_id"]) for it in items]
        batch["study_id"] = [str(it["study_id"]) for it in items]
        if all("index" in it for it in items):
            batch["index"] = torch.tensor([int(it["index"]) for it in items])
        return batch

    def _entities(self, encodings: Sequence[_TextEncoding], word_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        num_words = max(word_ids.shape[1], 1)  # spans over L word slots, as the text tower's merge_word_pieces gives
        e_max = max(1, max(len(e.entities or ()) for e in encodings))
        b = len(encodings)
        entity_ids = torch.full((b, e_max), -1, dtype=torch.long)
        entity_words = torch.zeros((b, e_max, num_words), dtype=torch.bool)
        for row, encoding in enumerate(encodings):
            for e, (idx, words) in enumerate(encoding.entities or ()):
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
        enc = self._pad([self.encode_text(t, with_entities=False) for t in swapped])
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        return {
            "swap_input_ids": enc["input_ids"],
            "swap_attention_mask": enc["attention_mask"],
            "swap_valid": torch.tensor(valid, dtype=torch.bool),
            # Per row: the counterfactual's token count, 0 without one. A list, so it stays on the host when the batch
            # moves to the GPU: MLIPModel._text_swap picks its rows and length from it without a device read.
            "swap_lengths": [int(n) if ok else 0 for n, ok in zip(lengths, valid, strict=True)],
        }
