"""Zero-shot: the score's sign on a constructed example, prompt averaging, and KB prompt handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mlip_fed.eval.zero_shot import class_prompt_embeddings, run_zero_shot, zero_shot_scores
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES, KnowledgeBase

CARDIO, EDEMA = CHEXPERT_CATEGORIES.index("Cardiomegaly"), CHEXPERT_CATEGORIES.index("Edema")
E = torch.eye(4)
PROMPT_VECTORS = {
    "enlarged heart": E[0],
    "cardiomegaly is present": torch.nn.functional.normalize(E[0] + 0.2 * E[2], dim=0),
    "normal heart size": E[1],
    "pulmonary edema": E[2],
    "no edema": E[3],
}


class PromptTable(nn.Module):
    """Text tower that maps each known prompt to a fixed vector (via a one-token id)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.stack(list(PROMPT_VECTORS.values()))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor):
        return type("T", (), {"embedding": self.table[input_ids[:, 0]]})()

    def encode_image(self, images: Tensor):  # pragma: no cover - zero-shot uses cached image embeddings
        raise AssertionError("not used")


def prompt_tokenizer(text, *, padding, truncation, max_length, return_tensors):
    ids = torch.tensor([[list(PROMPT_VECTORS).index(t)] for t in text])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _kb(swap: bool = False) -> KnowledgeBase:
    pos = {"Cardiomegaly": ("enlarged heart", "cardiomegaly is present"), "Edema": ("pulmonary edema",)}
    neg = {"Cardiomegaly": ("normal heart size",), "Edema": ("no edema",)}
    if swap:
        pos, neg = neg, pos
    return KnowledgeBase(
        version="test",
        concepts=(),
        category_descriptions={c: "a finding" for c in CHEXPERT_CATEGORIES},
        prompts_positive=pos,
        prompts_negative=neg,
    )


def _images(n: int = 40) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, generator=g) < 0.5).float()  # cardiomegaly
    b = (torch.rand(n, generator=g) < 0.5).float()  # edema
    emb = a[:, None] * E[0] + (1 - a[:, None]) * E[1] + b[:, None] * E[2] + (1 - b[:, None]) * E[3]
    emb = emb + 0.05 * torch.randn(n, 4, generator=g)
    labels = torch.full((n, len(CHEXPERT_CATEGORIES)), math.nan)
    labels[:, CARDIO], labels[:, EDEMA] = a, b
    return emb, labels


def test_score_sign_on_constructed_example() -> None:
    pos, neg = torch.stack([E[0]]), torch.stack([E[1]])
    scores = zero_shot_scores(torch.stack([E[0], E[1], E[0] + E[1]]), pos, neg)
    assert scores[0, 0] > 0 and scores[1, 0] < 0 and scores[2, 0] == pytest.approx(0.0, abs=1e-6)
    assert scores[0, 0] == pytest.approx(1.0)


def test_prompt_sets_are_averaged_and_normalised() -> None:
    pos, neg = class_prompt_embeddings(PromptTable(), prompt_tokenizer, ["Cardiomegaly"], "cpu", kb=_kb())
    expected = torch.nn.functional.normalize(
        PROMPT_VECTORS["enlarged heart"] + PROMPT_VECTORS["cardiomegaly is present"], dim=0
    )
    torch.testing.assert_close(pos[0], expected)
    torch.testing.assert_close(neg[0], E[1])


def test_run_zero_shot_auroc_follows_prompt_polarity() -> None:
    emb, labels = _images()
    good = run_zero_shot(PromptTable(), prompt_tokenizer, emb, labels, "cpu", kb=_kb())
    assert good.classes == ["Cardiomegaly", "Edema"]  # default: classes with both prompt sets
    assert good.per_class == {"Cardiomegaly": 1.0, "Edema": 1.0} and good.macro_auroc == 1.0
    assert good.accuracy == 1.0 and good.n_accuracy == int((labels[:, [CARDIO, EDEMA]].sum(1) == 1).sum())
    flipped = run_zero_shot(PromptTable(), prompt_tokenizer, emb, labels, "cpu", kb=_kb(swap=True))
    assert flipped.macro_auroc == 0.0


def test_missing_prompts_and_single_class_labels() -> None:
    emb, labels = _images()
    with pytest.raises(ValueError, match="Fracture"):
        run_zero_shot(PromptTable(), prompt_tokenizer, emb, labels, "cpu", kb=_kb(), classes=["Fracture"])
    labels[:, EDEMA] = 1.0
    res = run_zero_shot(PromptTable(), prompt_tokenizer, emb, labels, "cpu", kb=_kb())
    assert math.isnan(res.per_class["Edema"]) and res.macro_auroc == res.per_class["Cardiomegaly"]
    assert "Edema" in res.skipped
