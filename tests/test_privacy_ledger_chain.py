"""Tampering with the privacy ledger is evident: a hash chain over its events (``mlip-privacy audit`` says BROKEN
when one was edited or deleted), and a site whose ledger vanished while its state dir shows past participation
refuses to train until an operator acknowledges the reset (``mlip-privacy acknowledge-reset``)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mlip_fed.cli.privacy import main as privacy_main
from mlip_fed.privacy.audit import build_report, format_text
from mlip_fed.privacy.ledger import LEDGER_FILENAME, LedgerEvent, PrivacyLedger


def _event(rnd: int, kind: str = "train", steps: int = 3) -> LedgerEvent:
    return LedgerEvent("run-a", rnd, kind, "bucketed", 2.0, 1.0, 0.1, steps, details={"noise_source": "os_entropy"})


def _ledger(path: Path, rounds: int = 4) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.set_meta("policy", {"delta": 1e-5, "epsilon_budget": 50.0, "privacy_unit": "patient"})
        for rnd in range(1, rounds + 1):
            ledger.record(_event(rnd))


def _audit(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = privacy_main(["audit", "--ledger", str(path)])
    return code, capsys.readouterr().out


def test_an_intact_chain_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / LEDGER_FILENAME
    _ledger(path)
    with PrivacyLedger(path) as ledger:
        report = build_report(ledger)
    assert report["chain"]["status"] == "OK" and report["chain"]["chained_events"] == 4
    code, out = _audit(path, capsys)
    assert code == 0 and "chain             : OK" in out


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE events SET steps = 1 WHERE round = 2",  # edit an event in the middle
        "DELETE FROM events WHERE round = 2",  # delete one in the middle
        "DELETE FROM events WHERE round = 4",  # delete the newest
        "UPDATE events SET details = '{}' WHERE round = 1",  # edit the first
    ],
)
def test_edited_or_deleted_events_break_the_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str
) -> None:
    path = tmp_path / LEDGER_FILENAME
    _ledger(path)
    with sqlite3.connect(path) as conn:
        conn.execute(tamper)
    code, out = _audit(path, capsys)
    assert "chain             : BROKEN" in out
    assert "LEDGER TAMPERED" in out
    assert code == 1


def _old_ledger(path: Path) -> None:
    """A ledger as the previous version wrote it: no hash columns."""
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE events (
                id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, round INTEGER NOT NULL,
                kind TEXT NOT NULL, mechanism TEXT NOT NULL, noise_multiplier REAL NOT NULL,
                effective_noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
                accounted INTEGER NOT NULL, details TEXT NOT NULL, created_at TEXT NOT NULL,
                UNIQUE (run_id, round, kind));
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO events (run_id, round, kind, mechanism, noise_multiplier, effective_noise_multiplier,
                sample_rate, steps, accounted, details, created_at)
                VALUES ('old', 1, 'train', 'bucketed', 2.0, 1.0, 0.1, 3, 1, '{"noise_source": "os_entropy"}',
                '2024-01-01T00:00:00+00:00');
            """
        )


def test_old_ledgers_stay_readable_and_the_chain_starts_after_the_upgrade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / LEDGER_FILENAME
    _old_ledger(path)
    with PrivacyLedger(path) as ledger:
        assert [e.run_id for e in ledger.events()] == ["old"]
        report = build_report(ledger)
        assert report["chain"]["status"] == "LEGACY"  # nothing chained yet
        ledger.record(_event(1))
        report = build_report(ledger)
    assert report["chain"]["status"] == "OK"
    assert report["chain"]["legacy_events"] == 1 and report["chain"]["chained_events"] == 1
    text = format_text(report)
    assert "1 event(s) written before the upgrade" in text
    # the legacy events are anchored by the first chained event: editing one later is evident too
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE events SET steps = 1 WHERE run_id = 'old'")
    code, out = _audit(path, capsys)
    assert code == 1 and "BROKEN" in out


# ---------------------------------------------------------------------------------------------- deleted ledger
def _participated(state_dir: Path) -> None:
    (state_dir / "dp_replies" / "0123456789abcdef").mkdir(parents=True)
    (state_dir / "dp_replies" / "0123456789abcdef" / "round_0002.pt").write_bytes(b"x")
    (state_dir / "trainer_round_0002.pt").write_bytes(b"x")
    (state_dir / "bank_history.jsonl").write_text(json.dumps({"round": 2, "released_count": [0.0]}) + "\n")


def test_a_deleted_ledger_is_refused_until_acknowledged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlip_fed.privacy.ledger import LedgerMissing, check_ledger_continuity

    state = tmp_path / "state"
    state.mkdir()
    check_ledger_continuity(state)  # a fresh site: nothing to protect
    _participated(state)
    with pytest.raises(LedgerMissing) as err:
        check_ledger_continuity(state)
    message = str(err.value)
    assert str(state) in message
    assert "dp_replies" in message and "trainer_round_0002.pt" in message and "bank_history.jsonl" in message
    assert "mlip-privacy acknowledge-reset" in message
    assert not (state / LEDGER_FILENAME).exists()  # the check itself creates no (empty) ledger

    code = privacy_main(["acknowledge-reset", "--state-dir", str(state)])
    assert code == 2  # who and why are required
    capsys.readouterr()
    code = privacy_main(
        ["acknowledge-reset", "--state-dir", str(state), "--operator", "dpo@hospital", "--reason", "disk failure"]
    )
    assert code == 0
    capsys.readouterr()
    check_ledger_continuity(state)  # acknowledged: the site may train again
    record = json.loads((state / "ledger_resets.jsonl").read_text().splitlines()[-1])
    assert record["operator"] == "dpo@hospital" and record["reason"] == "disk failure"
    assert "trainer_round_0002.pt" in " ".join(record["found"])
    with PrivacyLedger(state / LEDGER_FILENAME) as ledger:
        report = build_report(ledger)
    assert any(w.startswith("LEDGER RESET") and "dpo@hospital" in w for w in report["warnings"])
    # a ledger that exists is not "reset" again
    assert privacy_main(["acknowledge-reset", "--state-dir", str(state), "--operator", "x", "--reason", "y"]) == 2
