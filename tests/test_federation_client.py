"""ClientApp glue in-process: a failing site answers with an error reply that names it."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import site_index_from_node_config, train
from mlip_fed.federation.payload import parse_site_error

pytestmark = pytest.mark.usefixtures("task_identity")


def _context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_site_index_checks_partitions_against_config() -> None:
    assert site_index_from_node_config({"partition-id": 2, "num-partitions": 3}, 3) == 2
    with pytest.raises(ValueError, match="num-supernodes=3"):
        site_index_from_node_config({"partition-id": 0, "num-partitions": 2}, 3)
    with pytest.raises(ValueError, match="site-config"):
        site_index_from_node_config({}, 3)


def test_raising_site_replies_with_error_naming_it() -> None:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=5, message_type="train")
    # A bad hydra override makes the site fail before training: the reply is an error, not an exception.
    context = _context({"partition-id": 1, "num-partitions": 3}, {"overrides": "train.batch_size=1"})
    reply = train(request, context)
    assert reply.has_error()
    assert parse_site_error(reply.error.reason) == "site_1"
    assert "train.batch_size" in reply.error.reason
