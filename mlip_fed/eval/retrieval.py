"""Paired image↔text retrieval on the test split: instance Recall@K, median rank, label-level P@K.

Image i and report i are the only correct pair for instance metrics. Similarities are computed one
block of queries at a time, so memory is ``block_size × N`` rather than ``N × N`` (5k pairs at
224² would otherwise need a 100 MB matrix per direction, more for larger test sets).

**Ties count against the query**: the rank of the true pair is 1 + the number of *other* candidates
scoring at least as high. A collapsed encoder (all embeddings equal) therefore gets rank N, not 1.
Real test sets contain duplicate normal reports ("No acute cardiopulmonary process"), whose text
embeddings tie exactly; that is why the label-level Precision@K (a hit is a retrieved item sharing
a positive label with the query) is reported beside the instance metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mlip_fed.eval.linear_probe import NanFloat


class DirectionResult(BaseModel):
    """Metrics for one retrieval direction."""

    model_config = ConfigDict(extra="forbid")

    recall: dict[int, float]  # K → fraction of queries whose true pair ranks ≤ K
    median_rank: float  # 1-based
    mean_rank: float
    precision: dict[int, NanFloat] = {}  # K → label-level precision@K (only when labels were given)


class RetrievalResult(BaseModel):
    """Image→text and text→image retrieval over N paired test items."""

    model_config = ConfigDict(extra="forbid")

    n: int
    image_to_text: DirectionResult
    text_to_image: DirectionResult


def true_pair_ranks(queries: Tensor, keys: Tensor, block_size: int = 1024) -> Tensor:
    """1-based rank of key i for query i (ties counted against the query), computed in blocks."""
    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must both be [N, D]")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        sim = q[start:stop] @ k.T  # [b, N]
        rows = torch.arange(stop - start)
        # Read the true score from the same matmul so rounding is identical for every candidate.
        true = sim[rows, torch.arange(start, stop)].unsqueeze(1)
        ranks[start:stop] = (sim >= true).sum(1)  # includes the true key itself → 1-based
    return ranks


def label_precision_at_k(
    queries: Tensor, keys: Tensor, query_labels: Tensor, key_labels: Tensor, ks: Sequence[int], block_size: int = 1024
) -> dict[int, float]:
    """Mean fraction of the top-K keys sharing ≥1 positive label with the query.

    Labels are binary [N, C]. Queries with no positive label cannot score a hit and are excluded;
    the result is NaN when no query has a positive label. A K above the number of keys is capped
    at it (so on a small test set P@50 is the precision over all keys).
    """
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    qy, ky = query_labels.float(), key_labels.float()
    valid = qy.sum(1) > 0
    if not bool(valid.any()):
        return {int(kk): math.nan for kk in ks}
    kmax = min(max(ks), k.shape[0])
    hits_sum = {int(kk): 0.0 for kk in ks}
    for start in range(0, q.shape[0], block_size):
        stop = min(q.shape[0], start + block_size)
        keep = valid[start:stop]
        if not bool(keep.any()):
            continue
        top = (q[start:stop][keep] @ k.T).topk(kmax, dim=1).indices  # [b, kmax], sorted by score
        shared = (qy[start:stop][keep].unsqueeze(1) * ky[top]).sum(-1) > 0  # [b, kmax]
        for kk in ks:
            kk_eff = min(int(kk), kmax)
            hits_sum[int(kk)] += float(shared[:, :kk_eff].float().mean(1).sum())
    n_valid = int(valid.sum())
    return {kk: v / n_valid for kk, v in hits_sum.items()}


def _direction(
    queries: Tensor,
    keys: Tensor,
    ks: Sequence[int],
    block_size: int,
    labels: Tensor | None,
    precision_ks: Sequence[int],
) -> DirectionResult:
    ranks = true_pair_ranks(queries, keys, block_size).double()
    return DirectionResult(
        recall={int(k): float((ranks <= k).double().mean()) for k in ks},
        median_rank=float(ranks.median()),  # lower median for even N: documented torch behaviour
        mean_rank=float(ranks.mean()),
        precision=(
            label_precision_at_k(queries, keys, labels, labels, precision_ks, block_size) if labels is not None else {}
        ),
    )


def retrieval_metrics(
    image_embedding: Tensor,
    text_embedding: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
    labels: Tensor | None = None,
    precision_ks: Sequence[int] = (5, 10, 50),
) -> RetrievalResult:
    """Recall@K both directions for paired embeddings [N, D]; label-level P@K when binary ``labels`` are given."""
    if image_embedding.shape != text_embedding.shape:
        raise ValueError(
            f"image {tuple(image_embedding.shape)} and text {tuple(text_embedding.shape)} embeddings must be paired"
        )
    if any(k <= 0 for k in ks) or any(k <= 0 for k in precision_ks):
        raise ValueError(f"K must be positive: ks={list(ks)}, precision_ks={list(precision_ks)}")
    if labels is not None and labels.shape[0] != image_embedding.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows for {image_embedding.shape[0]} pairs")
    return RetrievalResult(
        n=int(image_embedding.shape[0]),
        image_to_text=_direction(image_embedding, text_embedding, ks, block_size, labels, precision_ks),
        text_to_image=_direction(text_embedding, image_embedding, ks, block_size, labels, precision_ks),
    )
