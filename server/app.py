"""Flower ServerApp: moves messages between the grid and ``FederationCoordinator``; no ML here.

Our own round loop (pattern C of reference/flower-1.42.md §11) rather than ``FedAvg.start()``:
replies carry two ArrayRecords (weights and bank), every round is checkpointed and resumable, a
failing or silent site is named and left out, and each round is bounded by ``round_timeout_s``.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from mlip_fed.federation.coordinator import FederationCoordinator, coordinator_from_run
from mlip_fed.federation.run_config import experiment_from_run_config
from server.codec import MESSAGE_TYPE, encode_request, sort_replies

logger = logging.getLogger("mlip_fed.server")

app = ServerApp()


def _log(line: str) -> None:
    print(line, flush=True)  # the progress table must reach `flwr run --stream` as-is


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = experiment_from_run_config(context.run_config)
    coordinator = coordinator_from_run(run, log=_log)
    run_federation(grid, coordinator)


def run_federation(grid: Grid, coordinator: FederationCoordinator) -> dict:
    """The round loop; returns the final results (raises FederationFailed if nothing aggregated)."""
    fed = coordinator.fed
    coordinator.start()
    known_sites: dict[int, str] = {}
    for server_round in coordinator.remaining_rounds():
        node_ids = wait_for_nodes(grid, fed.min_available_nodes, fed.round_timeout_s)
        selected = coordinator.select_nodes(node_ids, server_round)
        content = encode_request(coordinator.round_request(server_round))
        messages = [
            Message(
                content,
                dst_node_id=node_id,
                message_type=MESSAGE_TYPE,
                group_id=str(server_round),
                ttl=fed.round_timeout_s,
            )
            for node_id in selected
        ]
        t0 = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        communication_s = time.perf_counter() - t0
        updates, failures = sort_replies(server_round, messages, replies, known_sites)
        coordinator.complete_round(
            server_round, updates, failures, num_sampled=len(selected), communication_seconds=communication_s
        )
    return coordinator.finish()


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float = 1.0) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; a clear error after ``timeout_s``.

    Flower's own ``sample_nodes`` polls forever; a federation whose sites never come must fail.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"only {len(node_ids)} node(s) connected after {timeout_s:.0f} s; "
                f"federation.min_available_nodes={minimum}"
            )
        time.sleep(poll_s)
