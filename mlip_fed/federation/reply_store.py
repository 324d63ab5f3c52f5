"""A DP site's released replies, kept in its state dir so that a retried round is answered byte for byte.

Why: a reply is a DP release. Re-running a retried round would draw fresh secret noise, and two independent noisy
outputs of the same round average the noise down; so a retry of the same request (``privacy.request_claims``) gets
the stored reply, and nothing is computed twice. The reply is written (atomically, fsynced) before it leaves the
site. ``exclusive`` serialises a site's DP rounds across processes, so two concurrent copies of one request cannot
both compute and release.

Layout: ``<state_dir>/dp_replies/<sha256(run id)[:16]>/round_<r>.pt`` (the run id comes from the server, so it is
never used as a path), holding ``{"digest", "update"}`` where ``update`` is the ``SiteUpdate``'s fields. Replies older
than the previous round are pruned, like the trainer checkpoints; a server never legitimately retries them, and the
request claims refuse to recompute a round whose reply is gone.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from mlip_fed.federation.payload import SiteUpdate
from mlip_fed.io import atomic_torch_save

REPLY_DIR = "dp_replies"
LOCK_FILE = "dp_round.lock"


@contextmanager
def exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the site's DP-round lock (``flock``; released by the OS if the process dies)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ReplyStore:
    """The stored replies of one run at one site."""

    def __init__(self, state_dir: Path, run_id: str) -> None:
        self.directory = Path(state_dir) / REPLY_DIR / hashlib.sha256(run_id.encode()).hexdigest()[:16]

    def path(self, rnd: int) -> Path:
        return self.directory / f"round_{rnd:04d}.pt"

    def save(self, rnd: int, digest: str, update: SiteUpdate) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.path(rnd), {"digest": digest, "update": asdict(update)})

    def load(self, rnd: int, digest: str) -> SiteUpdate | None:
        """The stored reply of round ``rnd`` if it answered request ``digest``; None if there is none."""
        path = self.path(rnd)
        if not path.is_file():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("digest") != digest:
            return None
        return SiteUpdate(**stored["update"])

    def prune(self, keep_from: int) -> None:
        for path in self.directory.glob("round_*.pt"):
            if int(path.stem.rsplit("_", 1)[1]) < keep_from:
                path.unlink()
