"""Sinkhorn codes, knowledge-guided category contrast and the prototype bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlip_fed.model.objectives.category_contrast import CategoryContrast, label_targets
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.model.objectives.sinkhorn import sinkhorn


def test_sinkhorn_marginals() -> None:
    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    q = sinkhorn(scores, epsilon=0.5, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(16), atol=1e-5)  # every sample is a distribution
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 16 / 4), atol=1e-3)  # equipartition over prototypes
    q3 = sinkhorn(scores)  # defaults: 3 iterations end on the sample step
    assert torch.allclose(q3.sum(dim=1), torch.ones(16), atol=1e-5)
    assert not q3.requires_grad


def test_sinkhorn_hand_value_uniform_scores() -> None:
    q = sinkhorn(torch.zeros(2, 2))
    assert torch.allclose(q, torch.full((2, 2), 0.5))


def test_label_targets() -> None:
    labels = torch.tensor([[1.0, float("nan"), 1.0], [0.0, -1.0, float("nan")]])
    y, has = label_targets(labels, 5)
    assert torch.allclose(y, torch.tensor([[0.5, 0, 0.5, 0, 0], [0, 0, 0, 0, 0]]))
    assert has.tolist() == [True, False]


def test_category_contrast_hand_value_and_gradients() -> None:
    # One knowledge prototype per axis, no free prototypes, eta = 1: codes are the labels exactly.
    module = CategoryContrast(2, 2, 0, temperature=1.0, label_mix=1.0)
    module.set_knowledge_prototypes(torch.eye(2))
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = module(v, t, torch.tensor([[1.0, 0.0]]))
    # image logits (1, 0) -> -log p(0) = log(1 + e^-1); text logits (0, 1) -> -log p(0) = log(1 + e)
    expected = 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.e))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert v.grad is not None and t.grad is not None
    assert list(module.parameters()) == []  # frozen knowledge prototypes are a buffer


def test_free_prototypes_get_gradients_and_stay_normalised() -> None:
    torch.manual_seed(0)
    module = CategoryContrast(8, 3, 5)
    v, t = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.full((6, 3), float("nan"))
    labels[0, 1] = 1.0
    module(v, t, labels).backward()
    assert module.free is not None and module.free.weight.grad is not None
    assert torch.allclose(module.free.weight.norm(dim=1), torch.ones(5), atol=1e-5)
    perm = torch.randperm(6)
    a, b = module(v, t, labels), module(v[perm], t[perm], labels[perm])
    assert a.item() == pytest.approx(b.item(), rel=1e-4)  # Sinkhorn is permutation-equivariant


def _bank_with(rows: list[tuple[list[float], int]]) -> PrototypeBank:
    bank = PrototypeBank(dim=2, categories=("a", "b"), min_count=2)
    for vec, cat in rows:
        labels = torch.full((1, 2), float("nan"))
        labels[0, cat] = 1.0
        bank.accumulate(torch.tensor([vec]), torch.tensor([vec]), labels)
    return bank


def test_prototype_bank_merge_count_weighted_with_min_count() -> None:
    site1 = _bank_with([([1.0, 0.0], 0), ([1.0, 0.0], 0), ([0.0, 1.0], 1)])
    site2 = _bank_with([([0.0, 1.0], 0)])
    server = PrototypeBank(dim=2, categories=("a", "b"), min_count=2)
    server.prototypes_image[1] = torch.tensor([0.6, 0.8])
    updated = server.merge([site1, site2])
    assert updated.tolist() == [True, False]  # category b has 1 < 2 examples: keeps its previous value
    assert torch.allclose(server.prototypes_image[0], F.normalize(torch.tensor([2.0, 1.0]), dim=0))
    assert torch.allclose(server.prototypes_image[1], torch.tensor([0.6, 0.8]))
    assert site1.count.tolist() == [2.0, 1.0]
    restored = PrototypeBank(dim=2, categories=("a", "b"), min_count=2)
    restored.load_state_dict(server.state_dict())
    assert torch.equal(restored.prototypes_image, server.prototypes_image)
    assert restored.initialized.tolist() == [True, False]
    with pytest.raises(ValueError, match="shape"):
        PrototypeBank(dim=3, categories=("a", "b")).load_state_dict(server.state_dict())
