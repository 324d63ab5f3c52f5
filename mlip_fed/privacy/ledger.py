"""The per-site privacy ledger: every DP event this site ever released, in SQLite.

Why SQLite: one file on site storage, atomic transactions, and a UNIQUE (run_id, round, kind)
key make a retried or crashed round idempotent: recording the same event twice is a no-op, and a
conflicting second version of it is refused instead of silently double-counting or overwriting.
The ledger spans every round and every run (Flower's ``context.state`` dies with the run), and the
accountant is rebuilt from it (``accountant.compute_epsilon(ledger.accounted_steps(), delta)``).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the accountant loads opacus and torch; reading a ledger (mlip-privacy) needs neither
    from mlip_fed.privacy.accountant import AccountedStep

#: The ledger's file name in a site's ``state_dir``; the one spelling the ClientApp and ``mlip-privacy`` share.
LEDGER_FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = 1
MECHANISMS = ("bucketed", "decomposable", "gaussian", "dp_fedavg", "unaccounted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    effective_noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accounted INTEGER NOT NULL,
    details TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (run_id, round, kind)
);
"""


class LedgerConflict(RuntimeError):
    """The same (run_id, round, kind) was recorded before with different parameters."""


@dataclass(frozen=True)
class LedgerEvent:
    """One release. ``noise_multiplier`` is sigma as configured; the accountant uses ``effective_noise_multiplier``
    (sigma / sensitivity factor: sigma/2 for bucketed clipping). ``accounted=False`` marks a release that left the site
    without DP (the audit warns about it)."""

    run_id: str
    round: int
    kind: str
    mechanism: str
    noise_multiplier: float
    effective_noise_multiplier: float
    sample_rate: float
    steps: int
    accounted: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"ledger event mechanism {self.mechanism!r} not in {MECHANISMS}")
        if not self.run_id or not self.kind:
            raise ValueError(f"ledger event needs a run_id and a kind, got {self.run_id!r}, {self.kind!r}")
        if self.accounted:
            self.step()  # validates
        elif self.mechanism != "unaccounted":
            raise ValueError(f"an unaccounted event must use mechanism 'unaccounted', got {self.mechanism!r}")

    def step(self) -> AccountedStep:
        from mlip_fed.privacy.accountant import AccountedStep

        return AccountedStep(self.effective_noise_multiplier, self.sample_rate, self.steps)

    def same_release(self, other: LedgerEvent) -> bool:
        keys = ("mechanism", "sample_rate", "noise_multiplier", "effective_noise_multiplier", "steps", "accounted")
        return all(
            (math.isclose(a, b, rel_tol=1e-12) if isinstance(a, float) else a == b)
            for a, b in ((getattr(self, k), getattr(other, k)) for k in keys)
        )


class PrivacyLedger:
    """SQLite ledger of one site. Safe across processes (transactions with BEGIN IMMEDIATE)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self.transaction() as cur:
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    cur.execute(statement)
            row = cur.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                cur.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ValueError(f"{self.path}: ledger schema version {row[0]}, this code reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT: a budget check and the insert it allows happen atomically."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {k: (json.loads(v) if k != "schema_version" else int(v)) for k, v in rows}

    # ------------------------------------------------------------------ events
    def record(self, event: LedgerEvent, cursor: sqlite3.Cursor | None = None) -> bool:
        """Insert ``event``; True if new, False if the identical event was already there (a retry).

        Raises LedgerConflict if (run_id, round, kind) exists with different parameters.
        """
        if cursor is None:
            with self.transaction() as cur:
                return self.record(event, cur)
        existing = self._get(cursor, event.run_id, event.round, event.kind)
        if existing is not None:
            if not existing.same_release(event):
                raise LedgerConflict(
                    f"{self.path}: run {event.run_id!r} round {event.round} kind {event.kind!r} was recorded as "
                    f"{_short(existing)}; refusing to record it again as {_short(event)}"
                )
            return False
        created = event.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        cursor.execute(
            "INSERT INTO events (run_id, round, kind, mechanism, noise_multiplier, effective_noise_multiplier, "
            "sample_rate, steps, accounted, details, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.run_id,
                event.round,
                event.kind,
                event.mechanism,
                float(event.noise_multiplier),
                float(event.effective_noise_multiplier),
                float(event.sample_rate),
                int(event.steps),
                int(event.accounted),
                json.dumps(event.details, sort_keys=True),
                created,
            ),
        )
        return True

    def _get(self, cur: sqlite3.Cursor, run_id: str, rnd: int, kind: str) -> LedgerEvent | None:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM events WHERE run_id=? AND round=? AND kind=?", (run_id, rnd, kind)
        ).fetchone()
        return _event(row) if row else None

    def events(self, cursor: sqlite3.Cursor | None = None) -> list[LedgerEvent]:
        cur = cursor or self._conn.cursor()
        return [_event(r) for r in cur.execute(f"SELECT {_COLUMNS} FROM events ORDER BY id").fetchall()]

    def accounted_steps(self, cursor: sqlite3.Cursor | None = None) -> list[AccountedStep]:
        return [e.step() for e in self.events(cursor) if e.accounted]


_COLUMNS = (
    "run_id, round, kind, mechanism, noise_multiplier, effective_noise_multiplier, sample_rate, steps, accounted, "
    "details, created_at"
)


def _event(row: tuple[Any, ...]) -> LedgerEvent:
    run_id, rnd, kind, mech, nm, enm, q, steps, accounted, details, created = row
    return LedgerEvent(
        run_id, int(rnd), kind, mech, nm, enm, q, int(steps), bool(accounted), json.loads(details), created
    )


def _short(e: LedgerEvent) -> str:
    d = asdict(e)
    return ", ".join(f"{k}={d[k]}" for k in ("mechanism", "noise_multiplier", "sample_rate", "steps", "accounted"))
