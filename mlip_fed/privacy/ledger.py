"""The per-site privacy ledger: every DP event this site ever released, in SQLite.

Why SQLite: one file on site storage, atomic transactions, and a UNIQUE (run_id, round, kind)
key make a retried or crashed round idempotent: recording the same event twice is a no-op, and a
conflicting second version of it is refused instead of silently double-counting or overwriting.
The ledger spans every round and every run (Flower's ``context.state`` dies with the run), and the
accountant is rebuilt from it (``accountant.compute_epsilon(ledger.accounted_steps(), delta)``).

Tamper evidence: every event stores ``prev_hash`` (the hash of the event before it) and ``hash`` = SHA-256 of
``prev_hash`` and its own content, and the meta key ``chain_head`` holds the newest hash and the number of chained
events. ``verify_chain`` recomputes it: an edited event, a deleted event (in the middle or at the end) or an event
inserted around ``record`` makes it BROKEN. Ledgers written before the chain existed stay readable: their events keep
no hash, the chain starts at the first event written after the upgrade, and that event's ``prev_hash`` anchors a
digest of all earlier ("legacy") events, so editing one of those later is evident too. The chain lives in the same
file: it shows naive edits, not an attacker who rewrites every hash (for that, keep the audit's ``head`` elsewhere).

A deleted ledger would silently reset the budget to 0. ``check_ledger_continuity(state_dir)`` refuses when the state
dir shows past participation (trainer checkpoints, stored DP replies, the bank history) but no ledger;
``acknowledge_reset`` (``mlip-privacy acknowledge-reset``) records who accepted the reset and why, in
``ledger_resets.jsonl`` beside it and in the new ledger, whose chain anchors that record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
    prev_hash TEXT,
    hash TEXT,
    UNIQUE (run_id, round, kind)
);
"""
#: Meta key of the chain's newest hash and length; ``prev_hash`` of a ledger's first chained event without history.
CHAIN_HEAD_META = "chain_head"
GENESIS = "genesis"
#: Meta key (and, beside the ledger in the state dir, a JSONL file) of acknowledged ledger resets.
RESETS_META = "ledger_resets"
RESETS_FILENAME = "ledger_resets.jsonl"


class LedgerMissing(RuntimeError):
    """The state dir shows that this site took part before, but its privacy ledger is gone."""


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
            columns = {r[1] for r in cur.execute("PRAGMA table_info(events)").fetchall()}
            for column in ("prev_hash", "hash"):  # a ledger from before the hash chain: its events stay unchained
                if column not in columns:
                    cur.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")

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
        content = (
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
        )
        head = cursor.execute("SELECT hash FROM events WHERE hash IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        prev = head[0] if head else _anchor(cursor)
        digest = _event_hash(prev, content)
        cursor.execute(
            "INSERT INTO events (run_id, round, kind, mechanism, noise_multiplier, effective_noise_multiplier, "
            "sample_rate, steps, accounted, details, created_at, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*content, prev, digest),
        )
        chained = cursor.execute("SELECT COUNT(*) FROM events WHERE hash IS NOT NULL").fetchone()[0]
        cursor.execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            (CHAIN_HEAD_META, json.dumps({"hash": digest, "events": int(chained)})),
        )
        return True

    def verify_chain(self) -> dict[str, Any]:
        """Recompute the hash chain; see ``verify_chain``."""
        return verify_chain(self._conn.cursor())

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


# ---------------------------------------------------------------------------------------------- hash chain
def _event_hash(prev: str, content: tuple[Any, ...]) -> str:
    """SHA-256 of the previous hash and an event's stored content (details as the stored JSON text)."""
    payload = json.dumps([prev, *content], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _anchor(cur: sqlite3.Cursor, before: int | None = None) -> str:
    """``prev_hash`` of the first chained event: a digest of the unchained (legacy) events before it and of the
    acknowledged resets recorded in the meta, or ``genesis`` for a ledger that starts empty."""
    legacy = cur.execute(
        f"SELECT {_COLUMNS} FROM events WHERE hash IS NULL AND id < ? ORDER BY id",
        (before if before is not None else 2**62,),
    ).fetchall()
    row = cur.execute("SELECT value FROM meta WHERE key=?", (RESETS_META,)).fetchone()
    resets = json.loads(row[0]) if row else []
    if not legacy and not resets:
        return GENESIS
    payload = json.dumps({"legacy": [list(r) for r in legacy], "resets": resets}, sort_keys=True)
    return "anchor:" + hashlib.sha256(payload.encode()).hexdigest()


def verify_chain(cur: sqlite3.Cursor) -> dict[str, Any]:
    """The chain's state: ``status`` OK | BROKEN | LEGACY (old ledger, nothing chained yet) | EMPTY, with
    ``problems`` (why BROKEN), ``legacy_events``, ``chained_events``, ``first_chained_id`` and ``head``."""
    rows = cur.execute(f"SELECT id, {_COLUMNS}, prev_hash, hash FROM events ORDER BY id").fetchall()
    row = cur.execute("SELECT value FROM meta WHERE key=?", (CHAIN_HEAD_META,)).fetchone()
    recorded_head = json.loads(row[0]) if row else None
    problems: list[str] = []
    legacy = chained = 0
    first_chained: int | None = None
    expected: str | None = None
    head: str | None = None
    for r in rows:
        event_id, content, prev, digest = r[0], tuple(r[1:12]), r[12], r[13]
        where = f"event id {event_id} (run {content[0]} round {content[1]} {content[2]})"
        if digest is None:
            if chained:
                problems.append(f"{where} has no hash but follows chained events: written around the ledger")
            else:
                legacy += 1
            continue
        if not chained:
            first_chained = event_id
            expected = _anchor(cur.connection.cursor(), before=event_id)
        chained += 1
        if prev != expected:
            problems.append(
                f"{where} does not follow the event before it (an event before it was deleted or edited, or an "
                "unchained event before the chain started was edited)"
            )
        if _event_hash(prev, content) != digest:
            problems.append(f"{where} was edited after it was recorded (its content no longer matches its hash)")
        expected = head = digest
    if recorded_head is not None and (recorded_head.get("hash") != head or recorded_head.get("events") != chained):
        missing = int(recorded_head.get("events", 0)) - chained
        problems.append(
            f"the newest chained event is not the one recorded last ({missing} event(s) missing at the end, or the "
            "last one was edited)"
            if missing > 0
            else "the chain's recorded head does not match its events"
        )
    status = "BROKEN" if problems else "OK" if chained else "LEGACY" if legacy else "EMPTY"
    return {
        "status": status,
        "problems": problems,
        "legacy_events": legacy,
        "chained_events": chained,
        "first_chained_id": first_chained,
        "head": head,
    }


# ---------------------------------------------------------------------------------------------- deleted ledgers
def participation_evidence(state_dir: Path) -> list[str]:
    """What in ``state_dir`` shows this site released something before: trainer checkpoints, stored DP replies, the
    bank history, an orphaned SQLite write-ahead log of the ledger."""
    state_dir = Path(state_dir)
    found: list[str] = []
    checkpoints = sorted(p.name for p in state_dir.glob("trainer_round_*.pt"))
    if checkpoints:
        found.append(f"{len(checkpoints)} trainer checkpoint(s) ({', '.join(checkpoints[:3])})")
    replies = state_dir / "dp_replies"
    stored = sorted(p for p in replies.rglob("*") if p.is_file()) if replies.is_dir() else []
    if stored:
        found.append(f"{len(stored)} stored DP reply file(s) under dp_replies/")
    history = state_dir / "bank_history.jsonl"
    if history.is_file() and history.stat().st_size > 0:
        rounds = sum(1 for line in history.read_text().splitlines() if line.strip())
        found.append(f"bank_history.jsonl ({rounds} round record(s))")
    for suffix in ("-wal", "-shm"):
        orphan = state_dir / (LEDGER_FILENAME + suffix)
        if orphan.is_file():
            found.append(f"{orphan.name} (the deleted ledger's SQLite log)")
    return found


def check_ledger_continuity(state_dir: Path) -> None:
    """Refuse (``LedgerMissing``) when ``state_dir`` has no ledger but shows past participation: training on would
    start the budget at 0 as if nothing had ever been spent. Reads only; creates nothing."""
    state_dir = Path(state_dir)
    if (state_dir / LEDGER_FILENAME).exists():
        return
    found = participation_evidence(state_dir)
    if not found:
        return
    earlier = state_dir / RESETS_FILENAME
    previous = (
        f" ({RESETS_FILENAME} shows {sum(1 for _ in earlier.open())} earlier acknowledged reset(s))"
        if earlier.is_file()
        else ""
    )
    raise LedgerMissing(
        f"privacy ledger {state_dir / LEDGER_FILENAME} is missing, but the state dir {state_dir} shows that this site "
        f"took part before: {'; '.join(found)}{previous}. Without the ledger the site's budget would silently "
        "restart at epsilon 0, so it refuses to train. Restore the ledger from a backup, or, if it is really lost, "
        f"have the privacy officer record the reset: mlip-privacy acknowledge-reset --state-dir {state_dir} "
        "--operator NAME --reason TEXT (the audit then reports the reset)"
    )


def acknowledge_reset(state_dir: Path, operator: str, reason: str) -> dict[str, Any]:
    """Record that ``operator`` accepts a lost ledger (``reason``): appended to ``<state_dir>/ledger_resets.jsonl``
    (fsynced) and kept in the new ledger's meta, which the chain of that ledger anchors. Returns the record."""
    state_dir = Path(state_dir)
    operator, reason = operator.strip(), reason.strip()
    if not operator or not reason:
        raise ValueError("acknowledge-reset needs --operator (who accepts the reset) and --reason (why)")
    ledger_path = state_dir / LEDGER_FILENAME
    if ledger_path.exists():
        raise ValueError(f"{ledger_path} exists: there is no reset to acknowledge (mlip-privacy audit reads it)")
    found = participation_evidence(state_dir)
    if not found:
        raise ValueError(
            f"{state_dir} shows no past participation and has no ledger: nothing to acknowledge; the site starts a "
            "fresh ledger on its first DP round"
        )
    record = {
        "acknowledged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "operator": operator,
        "reason": reason,
        "state_dir": str(state_dir),
        "found": found,
    }
    record["digest"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    with open(state_dir / RESETS_FILENAME, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    for suffix in ("-wal", "-shm"):  # the deleted ledger's log must not be replayed into the new file
        orphan = state_dir / (LEDGER_FILENAME + suffix)
        if orphan.is_file():
            orphan.rename(orphan.with_name(orphan.name + ".orphaned"))
    with PrivacyLedger(ledger_path) as ledger:
        ledger.set_meta(RESETS_META, [record])
    return record
