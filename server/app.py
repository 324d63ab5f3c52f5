"""Flower ServerApp: moves messages between the grid and ``FederationCoordinator``; no ML here.

Our own round loop (docs/federation.md "Why our own loop") rather than ``FedAvg.start()``:
replies carry two ArrayRecords (weights and bank), every round is checkpointed and resumable, a
failing or silent site is named and left out, and each round is bounded by ``round_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from mlip_fed.config import FederationConfig
from mlip_fed.federation.coordinator import FederationCoordinator, coordinator_from_run
from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteFailure
from mlip_fed.federation.run_config import experiment_from_run_config
from mlip_fed.federation.site_evaluation import SiteEvaluatorFn
from mlip_wire.codec import EVALUATE_MESSAGE_TYPE, MESSAGE_TYPE, decode_evaluation, encode_request, sort_replies

logger = logging.getLogger("mlip_fed.server")

app = ServerApp()


def _log(line: str) -> None:
    print(line, flush=True)  # the progress table must reach `flwr run --stream` as-is


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = experiment_from_run_config(context.run_config)
    fed = run.cfg.federation
    known_sites: dict[int, str] = {}
    coordinator = coordinator_from_run(run, log=_log, site_evaluator=site_evaluator(grid, fed, known_sites))
    if fed.secure_aggregation:  # SecAgg+ exists only as Flower's legacy workflow: server/secagg.py drives the rounds
        from server.secagg import run_secure_federation

        run_secure_federation(
            grid, context, coordinator, lambda: wait_for_nodes(grid, fed.min_available_nodes, fed.round_timeout_s)
        )
        return
    run_federation(grid, coordinator, known_sites)


def run_federation(grid: Grid, coordinator: FederationCoordinator, known_sites: dict[int, str] | None = None) -> dict:
    """The round loop; returns the final results (raises FederationFailed if nothing aggregated).

    ``known_sites`` (node id -> site id, filled by every reply) is shared with the site evaluator, so a site that
    fails in either is named.
    """
    fed = coordinator.fed
    known_sites = {} if known_sites is None else known_sites
    coordinator.start()
    for server_round in coordinator.remaining_rounds():
        try:
            node_ids = wait_for_nodes(grid, fed.min_available_nodes, fed.round_timeout_s, known_sites=known_sites)
        except QuorumTimeout as err:  # below quorum: skip this round (model unchanged), try again next round
            coordinator.complete_round(server_round, [], quorum_failures(server_round, err, known_sites), num_sampled=0)
            continue
        selected = coordinator.select_nodes(node_ids, server_round)
        content = encode_request(coordinator.round_request(server_round), fed.transport_dtype)
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
        replies = attribute_replies(messages, grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        communication_s = time.perf_counter() - t0
        updates, failures = sort_replies(server_round, messages, replies, known_sites)
        coordinator.complete_round(
            server_round, updates, failures, num_sampled=len(selected), communication_seconds=communication_s
        )
    return coordinator.finish()


def site_evaluator(grid: Grid, fed: FederationConfig, known_sites: dict[int, str]) -> SiteEvaluatorFn:
    """Evaluation where the data is: an ``evaluate`` message to every connected site, the replies sorted.

    Every connected site is asked, not only the round's sample: evaluation trains nothing and the more sites score
    the model, the more the aggregate says. A site that errs, refuses (its policy) or stays silent past the round
    timeout is a named failure; nobody connected is one failure, not an exception.
    """

    def evaluate(request: RoundRequest) -> tuple[list[SiteEvaluation], list[SiteFailure]]:
        server_round = request.server_round
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            return [], [SiteFailure(server_round, "(none)", 0, "no site connected for evaluation")]
        content = encode_request(request, fed.transport_dtype)
        messages = [
            Message(
                content,
                dst_node_id=node_id,
                message_type=EVALUATE_MESSAGE_TYPE,
                group_id=f"evaluate-{server_round}",
                ttl=fed.round_timeout_s,
            )
            for node_id in node_ids
        ]
        replies = attribute_replies(messages, grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        return sort_replies(server_round, messages, replies, known_sites, decode=decode_evaluation)

    return evaluate


def attribute_replies(sent: list[Message], replies: Iterable[Message]) -> list[Message]:
    """Give the SuperLink's own error replies the node they stand for.

    When a node stops heartbeating mid-round (killed, network gone), the SuperLink answers its message
    with ``NODE_UNAVAILABLE`` from *its own* node id, so the dead site would be listed twice: once as
    an anonymous error from the SuperLink and once as silent. Re-addressed to the request, the error is
    reported once, under the site that dropped out.
    """
    by_id = {m.metadata.message_id: m for m in sent if m.metadata.message_id}
    out = []
    for reply in replies:
        request = by_id.get(reply.metadata.reply_to_message_id)
        if request is not None and reply.has_error() and reply.metadata.src_node_id != request.metadata.dst_node_id:
            reply = Message(reply.error, reply_to=request)
        out.append(reply)
    return out


def quorum_failures(server_round: int, err: QuorumTimeout, known_sites: dict[int, str]) -> list[SiteFailure]:
    """Why a round never started: one entry per known site that was not connected, or one for the quorum.

    A site that is down must neither stall the federation nor end it: the round is recorded as not
    aggregated, the global model stays as it is, and the next round waits for the quorum again (the site
    rejoins then). Which sites were missing is only known for sites that answered an earlier round.
    """
    reason = f"not connected; round not started: {err}"
    named = [SiteFailure(server_round, known_sites[n], n, reason) for n in err.missing]
    return named or [SiteFailure(server_round, "(quorum)", 0, f"round not started: {err}")]


class QuorumTimeout(TimeoutError):
    """Fewer than ``min_available_nodes`` connected within the round timeout; ``connected`` lists those that were."""

    def __init__(self, message: str, connected: list[int], known: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.connected = connected
        self.missing = sorted(set(known or {}) - set(connected))


def wait_for_nodes(
    grid: Grid, minimum: int, timeout_s: float, poll_s: float = 1.0, known_sites: dict[int, str] | None = None
) -> list[int]:
    """Connected node ids once at least ``minimum`` are there; ``QuorumTimeout`` after ``timeout_s``.

    Flower's own ``sample_nodes`` polls forever: with ``min_available_nodes`` equal to the number of
    hospitals, one site down would stall the federation for good.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() >= deadline:
            raise QuorumTimeout(
                f"only {len(node_ids)} node(s) connected after {timeout_s:.0f} s; "
                f"federation.min_available_nodes={minimum}",
                node_ids,
                known_sites,
            )
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
