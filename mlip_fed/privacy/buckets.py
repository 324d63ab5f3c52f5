"""Patient -> bucket assignment for bucketed clipping.

The bucket of a record must be a fixed, public function of its own privacy unit (the patient id)
and nothing else: if it depended on which other records exist or were sampled, adding one patient
could move other records between buckets and the 2C sensitivity argument would fail. A keyed
BLAKE2b hash is stable across processes, machines and Python versions (``hash()`` is salted per
process), so a restarted site puts every patient in the same bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

#: Bumping this changes every assignment; it is part of the hash key so old ledgers stay interpretable.
BUCKET_HASH_VERSION = "mlip-fed-bucket-v1"


def bucket_of(unit_id: str, num_buckets: int, salt: str = "") -> int:
    """Bucket in [0, num_buckets) of one patient (or record) id."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if not isinstance(unit_id, str) or not unit_id:
        raise ValueError(f"bucket_of: the privacy-unit id must be a non-empty string, got {unit_id!r}")
    digest = hashlib.blake2b(unit_id.encode("utf-8"), digest_size=8, key=f"{BUCKET_HASH_VERSION}:{salt}".encode())
    return int.from_bytes(digest.digest(), "big") % num_buckets


def bucket_ids(unit_ids: Sequence[str], num_buckets: int, salt: str = "") -> torch.Tensor:
    """LongTensor [B] of buckets, the ``batch["group_ids"]`` the model masks cross-bucket interactions with."""
    return torch.tensor([bucket_of(str(u), num_buckets, salt) for u in unit_ids], dtype=torch.long)
