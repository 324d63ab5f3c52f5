"""Drop-outs and stragglers in the server round loop, with a scripted grid (no SuperLink).

What a real SuperLink does, reproduced by hand: a node whose heartbeats stop is answered with
``NODE_UNAVAILABLE`` *from the SuperLink's own node id*; an offline node is not in ``get_node_ids``;
a hung node never answers and the round ends at its timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FakeGrid, fake_coordinator, site_update, superlink_error
from flwr.app import Message

from mlip_fed.federation.payload import SiteUpdate
from mlip_wire.codec import decode_request, encode_update, sort_replies
from server.app import attribute_replies, run_federation

pytestmark = pytest.mark.usefixtures("task_identity")


def _update(site: str, value: float) -> SiteUpdate:
    return site_update(site, value, count0=6.0)


def _ok(node: int, message: Message) -> Message:
    value = float(decode_request(message.content).weights["w"][0]) + node if "config" in message.content else 0.0
    return Message(encode_update(_update(f"site_{node}", value)), reply_to=message)


def test_node_unavailable_is_reported_once_under_the_dropped_site() -> None:
    sent = [
        Message(encode_update(_update("x", 0.0)), dst_node_id=n, message_type="train", group_id="2") for n in (5, 6)
    ]
    for i, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"id{i}"
    replies = attribute_replies(sent, [_ok(5, sent[0]), superlink_error(sent[1])])
    updates, failures = sort_replies(2, sent, replies, {6: "hospital_c"})
    assert [u.site_id for u in updates] == ["site_5"]
    assert [(f.site_id, f.node_id) for f in failures] == [("hospital_c", 6)]
    assert "Node Unavailable" in failures[0].reason
    # Without re-addressing, the SuperLink's reply would name the SuperLink and the site would also look silent.
    _, raw = sort_replies(2, sent, [_ok(5, sent[0]), superlink_error(sent[1])], {6: "hospital_c"})
    assert len(raw) == 2


def test_site_killed_mid_round_is_left_out_and_rejoins_next_round(tmp_path: Path) -> None:
    def respond(node: int, server_round: int, message: Message) -> Message | str | None:
        if node == 2 and server_round == 2:
            return "dead"  # killed after pulling round 2's message; restarted before round 3
        return _ok(node, message)

    grid = FakeGrid(lambda r: [0, 1, 2], respond)
    summary = run_federation(grid, fake_coordinator(tmp_path, num_rounds=3, min_available_nodes=3, min_train_nodes=3))
    rounds = summary["rounds"]
    assert [[s["site_id"] for s in r["sites"]] for r in rounds[1:]] == [
        ["site_0", "site_1", "site_2"],
        ["site_0", "site_1"],
        ["site_0", "site_1", "site_2"],
    ]
    assert [f["site_id"] for f in summary["failures"]] == ["site_2"]  # named once, from round 1's reply
    assert summary["failures"][0]["round"] == 2 and "Node Unavailable" in summary["failures"][0]["reason"]
    # round 2 aggregated the two survivors: w = (1 + 0) + (1 + 1) / 2 = 1.5 after round 1's w = 1
    assert rounds[2]["eval"]["auroc"] == pytest.approx(1.5) and summary["status"] == "completed"


def test_round_below_quorum_is_skipped_not_fatal(tmp_path: Path) -> None:
    """Site 2 is down before round 2 is sampled and back for round 3: round 2 waits its timeout, is recorded
    as not aggregated with the missing site named, and the run goes on."""
    coordinator = fake_coordinator(
        tmp_path, num_rounds=3, min_available_nodes=3, min_train_nodes=2, round_timeout_s=0.05
    )
    next_round = lambda: coordinator.state.completed_round + 1  # noqa: E731
    grid = FakeGrid(lambda r: [0, 1] if next_round() == 2 else [0, 1, 2], lambda n, r, m: _ok(n, m))
    summary = run_federation(grid, coordinator)
    assert [r for r, _ in grid.sent_rounds] == [1, 3]  # nothing was sent in round 2
    skipped = summary["rounds"][2]
    assert skipped["aggregated"] is False and skipped["num_updates"] == 0
    assert [(f["site_id"], f["node_id"]) for f in skipped["failures"]] == [("site_2", 2)]
    assert "min_available_nodes=3" in skipped["failures"][0]["reason"]
    assert summary["status"] == "completed" and summary["aggregated_rounds"] == 2
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["completed_rounds"] == 3


def test_hung_site_ends_at_the_timeout_and_is_named(tmp_path: Path) -> None:
    grid = FakeGrid(lambda r: [0, 1], lambda n, r, m: None if (n == 1 and r == 2) else _ok(n, m))
    summary = run_federation(grid, fake_coordinator(tmp_path, num_rounds=2, min_available_nodes=2, min_train_nodes=2))
    assert summary["failures"] == [
        {"round": 2, "site_id": "site_1", "node_id": 1, "reason": "no reply before the round timeout"}
    ]
    assert summary["rounds"][2]["num_updates"] == 1 and summary["rounds"][2]["aggregated"] is True


def test_no_quorum_ever_fails_the_run_with_the_quorum_named(tmp_path: Path) -> None:
    from mlip_fed.federation.coordinator import FederationFailed

    grid = FakeGrid(lambda r: [0], lambda n, r, m: _ok(n, m))
    with pytest.raises(FederationFailed):
        run_federation(grid, fake_coordinator(tmp_path, num_rounds=1, min_available_nodes=2, round_timeout_s=0.05))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["failures"][0]["site_id"] == "(quorum)" and "only 1 node(s)" in results["failures"][0]["reason"]
