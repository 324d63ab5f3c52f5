"""Which request a DP site answered for each (run, round), so that a round is released exactly once.

Why: the ledger charges a (run, round, kind) once, and a retried round costs nothing new *only if the retry releases
nothing new*. A server that resends round r with different global weights would otherwise get a second, uncharged
release (with secret noise: a second independent output; with reproducible noise: the same noise, whose difference
cancels). So each round's request is fingerprinted (``request_digest``: SHA-256 of the weights, the bank and the
round config) and claimed in the site's ledger database before training:

- same (run, round) and same digest: a retry. The stored reply is sent again (``federation.reply_store``); if the
  round never produced a reply (a crash before it was stored), it runs again -- nothing left the site.
- same (run, round), another digest: refused (``RequestConflict``). One round, one release.

The claims live in the ledger's SQLite file (table ``requests``, created on first use; the events table and its
schema version are untouched) and every check-and-insert runs in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from mlip_fed.privacy.ledger import PrivacyLedger

_TABLE = """
CREATE TABLE IF NOT EXISTS requests (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    digest TEXT NOT NULL,
    replied INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
)
"""


class RequestConflict(RuntimeError):
    """A (run, round) already claimed by a request with other weights, bank or settings."""


@dataclass(frozen=True)
class Claim:
    digest: str
    replied: bool


def request_digest(
    weights: Mapping[str, torch.Tensor], bank: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, and the round config (canonical JSON)."""
    h = hashlib.sha256()
    for label, group in (("weights", weights), ("bank", bank)):
        for key in sorted(group):
            tensor = group[key].detach().cpu().contiguous()
            h.update(f"{label}/{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    return h.hexdigest()


class RequestClaims:
    """The ``requests`` table of one site's ledger."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self.ledger = ledger
        with ledger.transaction() as cur:
            cur.execute(_TABLE)

    def lookup(self, run_id: str, rnd: int) -> Claim | None:
        with self.ledger.transaction() as cur:
            row = cur.execute(
                "SELECT digest, replied FROM requests WHERE run_id=? AND round=?", (run_id, rnd)
            ).fetchone()
        return None if row is None else Claim(row[0], bool(row[1]))

    def claim(self, run_id: str, rnd: int, digest: str) -> Claim:
        """Record that (run, round) answers ``digest``; the existing claim if it already does; raise on another."""
        with self.ledger.transaction() as cur:
            row = cur.execute(
                "SELECT digest, replied FROM requests WHERE run_id=? AND round=?", (run_id, rnd)
            ).fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO requests (run_id, round, digest, replied, created_at) VALUES (?, ?, ?, 0, ?)",
                    (run_id, rnd, digest, datetime.now(UTC).isoformat(timespec="seconds")),
                )
                return Claim(digest, False)
        if row[0] != digest:
            raise RequestConflict(conflict_reason(run_id, rnd, row[0], digest))
        return Claim(row[0], bool(row[1]))

    def mark_replied(self, run_id: str, rnd: int, digest: str) -> None:
        """The reply of (run, round) is stored and may leave: from now on the round is never computed again."""
        with self.ledger.transaction() as cur:
            updated = cur.execute(
                "UPDATE requests SET replied=1 WHERE run_id=? AND round=? AND digest=?", (run_id, rnd, digest)
            ).rowcount
        if updated != 1:
            raise RequestConflict(f"run {run_id!r} round {rnd}: no claim for request {digest[:12]} to mark replied")


def conflict_reason(run_id: str, rnd: int, claimed: str, digest: str) -> str:
    return (
        f"run {run_id!r} round {rnd} was already requested with other global weights/settings (request "
        f"{claimed[:12]}, now {digest[:12]}); a site releases each round once"
    )
