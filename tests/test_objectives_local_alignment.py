"""Token-knowledge-patch local alignment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlip_fed.model.objectives.local_alignment import fuse_knowledge, local_alignment_loss


def _inputs(b: int = 3, m: int = 5, p: int = 4, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    word_mask = torch.ones(b, m, dtype=torch.bool)
    word_mask[0, 3:] = False
    ww = torch.rand(b, m, generator=g) * word_mask
    return {
        "words": F.normalize(torch.randn(b, m, d, generator=g), dim=-1),
        "word_mask": word_mask,
        "word_weights": ww / ww.sum(dim=1, keepdim=True),
        "patches": F.normalize(torch.randn(b, p, d, generator=g), dim=-1),
        "patch_weights": torch.full((b, p), 1.0 / p),
    }


def test_hand_value_two_orthogonal_words_two_patches() -> None:
    eye = torch.eye(2).unsqueeze(0)
    parts = local_alignment_loss(
        eye, torch.ones(1, 2, dtype=torch.bool), torch.full((1, 2), 0.5), eye, torch.full((1, 2), 0.5), temperature=1.0
    )
    # word m attends a = softmax((1, 0)) over patches; summary s_m = normalize(a0 e_m + a1 e_other)
    a0, a1 = math.e / (1 + math.e), 1 / (1 + math.e)
    norm = math.hypot(a0, a1)
    pos, neg = a0 / norm, a1 / norm
    ce = -math.log(math.exp(pos) / (math.exp(pos) + math.exp(neg)))
    assert parts["word"].item() == pytest.approx(ce, abs=1e-5)
    assert parts["patch"].item() == pytest.approx(ce, abs=1e-5)


def test_padding_words_do_not_change_loss_and_batch_permutation_invariant() -> None:
    x = _inputs()
    base = local_alignment_loss(**x)
    y = dict(x)
    y["words"] = x["words"].clone()
    y["words"][0, 3:] = F.normalize(torch.randn(2, 8), dim=-1)  # garbage in the padded slots
    again = local_alignment_loss(**y)
    for key in base:
        assert base[key].item() == pytest.approx(again[key].item(), rel=1e-5)
    perm = torch.tensor([2, 0, 1])
    permuted = local_alignment_loss(**{k: v[perm] for k, v in x.items()})
    assert sum(base.values()).item() == pytest.approx(sum(permuted.values()).item(), rel=1e-5)


def test_knowledge_fusion_and_gradients() -> None:
    x = _inputs()
    b, m, d = x["words"].shape
    knowledge = F.normalize(torch.randn(b, 2, d), dim=-1).requires_grad_(True)
    entity_mask = torch.tensor([[True, False], [True, True], [False, False]])
    entity_words = torch.zeros(b, 2, m, dtype=torch.bool)
    entity_words[0, 0, 1:3] = True
    entity_words[1, 0, 0] = True
    entity_words[1, 1, 4] = True
    fused = fuse_knowledge(x["words"], knowledge, entity_mask, entity_words)
    assert torch.allclose(fused[2], x["words"][2])  # no entity: unchanged
    assert torch.allclose(fused[0, 0], x["words"][0, 0])  # outside the span
    assert torch.allclose(fused[0, 1], F.normalize(x["words"][0, 1] + knowledge[0, 0], dim=-1))
    words = x["words"].clone().requires_grad_(True)
    patches = x["patches"].clone().requires_grad_(True)
    parts = local_alignment_loss(
        words,
        x["word_mask"],
        x["word_weights"],
        patches,
        x["patch_weights"],
        knowledge=knowledge,
        entity_mask=entity_mask,
        entity_words=entity_words,
    )
    assert set(parts) == {"word", "patch", "knowledge_patch"}
    assert all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    for t in (words, patches, knowledge):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert knowledge.grad[0, 1].abs().sum() == 0  # masked-out entity has no influence


def test_span_width_mismatch_is_an_error() -> None:
    x = _inputs()
    with pytest.raises(ValueError, match="spans cover"):
        local_alignment_loss(
            **x,
            knowledge=torch.zeros(3, 1, 8),
            entity_mask=torch.ones(3, 1, dtype=torch.bool),
            entity_words=torch.zeros(3, 1, 7, dtype=torch.bool),
        )
