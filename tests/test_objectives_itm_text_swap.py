"""ITM hard negatives, the fusion head and counterfactual report editing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mlip_fed.knowledge.counterfactual import make_counterfactual
from mlip_fed.knowledge.mentions import Mention
from mlip_fed.model.objectives.itm import FusionHead, itm_loss, sample_negatives


def test_negatives_exclude_positive_and_follow_similarity() -> None:
    sim = torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(3, dtype=torch.long)
    for _ in range(50):
        neg_text, neg_image = sample_negatives(sim, generator=g)
        assert (neg_text != torch.arange(3)).all() and (neg_image != torch.arange(3)).all()
        hits[neg_text[0]] += 1
    assert hits[1] >= 49  # softmax(10 vs -10) puts ~all mass on text 1
    with pytest.raises(ValueError):
        sample_negatives(torch.zeros(1, 1))


def test_itm_loss_hand_value_and_gradients() -> None:
    torch.manual_seed(0)
    head = FusionHead(text_dim=16, image_dim=8, layers=1, heads=4)
    with torch.no_grad():  # a classifier that outputs zeros: CE = log 2 for every pair
        head.classifier.weight.zero_()
        head.classifier.bias.zero_()
    tokens, mask, patches = torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.long), torch.randn(3, 4, 8)
    loss = itm_loss(head, tokens, mask, patches, torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    head2 = FusionHead(text_dim=16, image_dim=8)
    itm_loss(head2, tokens, mask, patches, torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])).backward()
    assert all(p.grad is not None for p in head2.parameters())


def _m(text: str, phrase: str, certainty: str, category: str | None, laterality: str | None = None) -> Mention:
    start = text.index(phrase)
    return Mention(
        concept_id=phrase.replace(" ", "_"),
        category=category,
        start=start,
        end=start + len(phrase),
        text=phrase,
        certainty=certainty,  # type: ignore[arg-type]
        laterality=laterality,  # type: ignore[arg-type]
        sentence_start=0,
        sentence_end=len(text),
    )


def test_counterfactual_negation_flips() -> None:
    text = "No pneumothorax."
    out = make_counterfactual(text, [_m(text, "pneumothorax", "negative", "Pneumothorax")], random.Random(0))
    assert out == "Pneumothorax."
    text = "There is a large consolidation."
    m = _m(text, "consolidation", "positive", "Consolidation")
    pool = [("Consolidation", "consolidation")]  # only same-category replacements: swap impossible, negation left
    assert make_counterfactual(text, [m], random.Random(0), findings=pool) == "There is no large consolidation."


def test_counterfactual_laterality_and_finding_swap() -> None:
    text = "Small left pleural effusion."
    m = _m(text, "pleural effusion", "negative", "Pleural Effusion", laterality="left")  # negated: no swap/negation cue
    assert make_counterfactual(text, [m], random.Random(0), findings=[]) == "Small right pleural effusion."
    m = _m(text, "pleural effusion", "positive", "Pleural Effusion")
    outs = {
        make_counterfactual(text, [m], random.Random(s), findings=[("Pneumothorax", "pneumothorax")]) for s in range(20)
    }
    assert "Small left pneumothorax." in outs
    assert all(o is not None and o != text for o in outs)


def test_counterfactual_none_and_bad_span() -> None:
    assert make_counterfactual("Normal study.", [], random.Random(0)) is None
    bad = Mention("x", None, 5, 50, "x", "positive")
    with pytest.raises(ValueError, match="outside"):
        make_counterfactual("short", [bad], random.Random(0))
