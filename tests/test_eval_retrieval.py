"""Retrieval: Recall@K on identical embeddings, a hand-computed example, blocks, ties, label precision."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_fed.eval.retrieval import label_precision_at_k, retrieval_metrics, true_pair_ranks


def test_identical_embeddings_give_perfect_recall() -> None:
    emb = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    res = retrieval_metrics(emb, emb.clone(), block_size=7)
    for d in (res.image_to_text, res.text_to_image):
        assert d.recall == {1: 1.0, 5: 1.0, 10: 1.0}
        assert d.median_rank == 1.0 and d.mean_rank == 1.0
    assert res.n == 50


def test_hand_example() -> None:
    s = 2**-0.5
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s], [1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 1.0], [s, s], [0.6, 0.8]])
    # image→text sims: row0 [0, 0, .71, .6] true 0 → rank 4 (ties with t1 count against);
    # row1 [1, 1, .71, .8] true 1 → rank 2 (tie with t0); row2 [.71, .71, 1, .99] → 1; row3 [0, 0, .71, .6] → 2.
    assert true_pair_ranks(image, text).tolist() == [4, 2, 1, 2]
    # text→image sims: row0 [0, 1, .71, 0] true 0 → 4; row1 [0, 1, .71, 0] → 1; row2 [.71, .71, 1, .71] → 1;
    # row3 [.6, .8, .99, .6] true 3 → rank 4 (tie with image0).
    assert true_pair_ranks(text, image).tolist() == [4, 1, 1, 4]
    res = retrieval_metrics(image, text, ks=(1, 2, 5))
    assert res.image_to_text.recall == {1: 0.25, 2: 0.75, 5: 1.0}
    assert res.text_to_image.recall == {1: 0.5, 2: 0.5, 5: 1.0}
    assert res.image_to_text.mean_rank == pytest.approx(2.25)


def test_blocks_do_not_change_ranks() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(37, 8, generator=g), torch.randn(37, 8, generator=g)
    full = true_pair_ranks(q, k, block_size=1024)
    for bs in (1, 5, 36):
        assert torch.equal(true_pair_ranks(q, k, block_size=bs), full)


def test_collapsed_encoder_is_not_rewarded() -> None:
    emb = torch.ones(10, 4)
    res = retrieval_metrics(emb, emb)
    assert res.image_to_text.recall[1] == 0.0 and res.image_to_text.median_rank == 10


def test_label_precision_hand_example() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    key_labels = torch.tensor([[1, 0], [0, 1], [1, 0]])
    p = label_precision_at_k(q, q, labels, key_labels, ks=(1, 2, 3))
    # q0: top k0,k2,k1 → hits 1,1,0; q1: top k1,k2,k0 → 1,0,0; q2: top k2,k0,k1 → 1,1,1.
    assert p[1] == pytest.approx(1.0)
    assert p[2] == pytest.approx((1 + 0.5 + 1) / 3)
    assert p[3] == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    assert math.isnan(label_precision_at_k(q, q, torch.zeros(3, 2), key_labels, ks=(1,))[1])


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="paired"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), ks=(0,))
