"""SecAgg+ rounds: Flower's legacy ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow)`` driving our coordinator.

Flower 1.42 has SecAgg+ only on the legacy API (``flwr.server.workflow``; no Message-API port), so a secure federation runs the
legacy workflow with a small legacy ``Strategy`` instead of our own round loop. The strategy holds no ML: it turns
the coordinator's round request into ``FitIns`` and hands the unmasked aggregate (the only thing the workflow
exposes) to ``FederationCoordinator.complete_secure_round``, which does the optimiser step, bank merge,
evaluation, checkpoint and results exactly as a plain round.

What the workflow gives: the mean over the sites whose masked vectors were summed; each site's FitRes with its
parameters replaced by that mean; the plain FitRes metrics; failures as bare exceptions without node ids. A round
whose key shares fall below the threshold ends without ``aggregate_fit``: the next ``configure_fit`` (or the end of
the run) records it as not aggregated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from mlip_fed.federation.coordinator import FederationCoordinator
from mlip_fed.federation.payload import SiteFailure, parse_site_error
from mlip_fed.federation.secure_payload import (
    CLIPPING_RANGE,
    MAX_SITES,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    flatten_request,
    packed_sizes,
    unpack_aggregate,
)
from mlip_wire.codec import LAYOUT_KEY, MAX_EXAMPLES_KEY, SITE_ID_METRIC

logger = logging.getLogger("mlip_fed.server")

#: Bytes of one site's masked upload per packed value (SecAgg+ sends int64 after masking), plus the weight factor.
MASKED_VALUE_BYTES = 8


class SecureRoundStrategy(Strategy):
    """Legacy strategy whose every decision is the coordinator's; it only converts to and from legacy types."""

    def __init__(self, coordinator: FederationCoordinator, wait_nodes: Callable[[], list[int]]) -> None:
        self.coordinator = coordinator
        self.wait_nodes = wait_nodes
        self.known_sites: dict[int, str] = {}
        #: (round, selected node ids, start time) of the round in flight, until aggregate_fit closes it.
        self._pending: tuple[int, list[int], float] | None = None

    # ------------------------------------------------------------------ training
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        # A placeholder, so the workflow asks no site for initial parameters: the global state is the coordinator's.
        return ndarrays_to_parameters([np.zeros(1, dtype=np.float32)])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.close_pending("the SecAgg+ protocol halted (too few sites left to unmask)")
        coordinator = self.coordinator
        rnd = coordinator.state.completed_round + 1  # the workflow counts 1..n; after a resume ours starts later
        try:
            node_ids = self.wait_nodes()
        except TimeoutError as err:  # below quorum: record the round as not aggregated; the next one waits again
            reason = f"round not started: {err}"
            coordinator.complete_secure_round(rnd, None, [SiteFailure(rnd, "(quorum)", 0, reason)], num_sampled=0)
            return []
        selected = coordinator.select_nodes(node_ids, rnd)
        if len(selected) > MAX_SITES:
            raise ValueError(f"SecAgg+ with {len(selected)} sites: the quantization here allows at most {MAX_SITES}")
        proxies = client_manager.all()
        missing = [n for n in selected if str(n) not in proxies]
        if missing:
            raise RuntimeError(f"round {rnd}: nodes {missing} are connected but not registered with the workflow")
        request = coordinator.round_request(rnd)
        arrays, names, shapes = flatten_request(request.weights, request.bank)
        config: dict[str, Scalar] = dict(request.config)
        config[LAYOUT_KEY] = json.dumps({"names": names, "shapes": shapes, "num_weights": len(request.weights)})
        config[MAX_EXAMPLES_KEY] = int(coordinator.fed.secagg_max_examples)
        fitins = FitIns(parameters=ndarrays_to_parameters([a.numpy() for a in arrays]), config=config)
        self._pending = (rnd, selected, time.perf_counter())
        return [(proxies[str(n)], fitins) for n in selected]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self._pending is None:
            raise RuntimeError(f"aggregate_fit for workflow round {server_round} without a configured round")
        rnd, selected, t0 = self._pending
        self._pending = None
        communication_s = time.perf_counter() - t0
        coordinator = self.coordinator
        site_ids, site_metrics, contributed = [], [], set()
        for proxy, fitres in results:
            metrics = dict(fitres.metrics)
            site_id = str(metrics.pop(SITE_ID_METRIC, f"node-{proxy.node_id}"))
            self.known_sites[int(proxy.node_id)] = site_id
            contributed.add(int(proxy.node_id))
            site_ids.append(site_id)
            site_metrics.append({k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
        order = sorted(range(len(site_ids)), key=lambda i: site_ids[i])
        site_ids, site_metrics = [site_ids[i] for i in order], [site_metrics[i] for i in order]
        lost = [n for n in selected if n not in contributed]
        round_failures = self._failures(rnd, lost, failures)
        aggregate = None
        if results:
            state = coordinator.state
            aggregate = unpack_aggregate(
                [np.asarray(a) for a in parameters_to_ndarrays(results[0][1].parameters)],
                len(results),
                float(coordinator.fed.secagg_max_examples),
                state.weights,
                _bank_stat_template(state.bank),
            )
        sizes = packed_sizes(coordinator.state.weights, _bank_stat_template(coordinator.state.bank))
        coordinator.complete_secure_round(
            rnd,
            aggregate,
            round_failures,
            num_sampled=len(selected),
            site_ids=site_ids,
            site_metrics=site_metrics,
            up_bytes_per_site=(sum(sizes) + 1) * MASKED_VALUE_BYTES,
            communication_seconds=communication_s,
        )
        return None, {}  # the global state lives in the coordinator, not in the workflow's parameters record

    def close_pending(self, reason: str) -> None:
        """Record a round the workflow abandoned before ``aggregate_fit`` as not aggregated."""
        if self._pending is None:
            return
        rnd, selected, t0 = self._pending
        self._pending = None
        failures = [SiteFailure(rnd, self.known_sites.get(n, f"node-{n}"), n, reason) for n in selected]
        self.coordinator.complete_secure_round(
            rnd, None, failures, num_sampled=len(selected), communication_seconds=time.perf_counter() - t0
        )

    def _failures(
        self, rnd: int, lost: list[int], failures: list[tuple[ClientProxy, FitRes] | BaseException]
    ) -> list[SiteFailure]:
        """One entry per sampled node whose vector is not in the sum, with the site's own reason when it sent one.

        The workflow reports failures without node ids; a site names itself in its error (``format_site_error``).
        """
        reasons = [_reason(f) for f in failures if isinstance(f, BaseException)]
        named = {parse_site_error(r): r for r in reasons if parse_site_error(r)}
        out = []
        for node_id in lost:
            site_id = self.known_sites.get(node_id, f"node-{node_id}")
            reason = named.pop(site_id, None)
            out.append(SiteFailure(rnd, site_id, node_id, f"error reply: {reason.strip()}" if reason else ""))
        for failure in out:  # sites never seen before: their ids are only in the reasons left over
            if not failure.reason:
                if failure.site_id.startswith("node-") and len(named) == 1:
                    failure.site_id, reason = named.popitem()
                    failure.reason = f"error reply: {reason.strip()}"
                else:
                    failure.reason = "dropped out of the SecAgg+ round (no reply, or an error without a site id)"
        return out

    # ------------------------------------------------------------------ evaluation: the coordinator's, per round
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def _reason(failure: BaseException) -> str:
    """The reason text of a failure as the workflow wraps it: ``Exception(flwr Error)``."""
    inner = failure.args[0] if failure.args else failure
    return str(getattr(inner, "reason", None) or inner)


def _bank_stat_template(bank: dict) -> dict:
    """Shapes of the bank statistics a site sends, from the global bank (K x d sums, K counts)."""
    import torch

    proto = bank["prototypes_image"]
    return {
        "sum_image": torch.zeros(proto.shape),
        "sum_text": torch.zeros(bank["prototypes_text"].shape),
        "count": torch.zeros(proto.shape[0]),
    }


def secagg_workflow(coordinator: FederationCoordinator) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with our quantization; each of its 4 stages waits at most ``round_timeout_s``."""
    fed = coordinator.fed
    return SecAggPlusWorkflow(
        num_shares=fed.secagg_num_shares,
        reconstruction_threshold=fed.secagg_reconstruction_threshold,
        max_weight=1.0,  # every site reports num_examples=1: SecAgg+'s mean is a plain mean (secure_payload)
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=fed.round_timeout_s,
    )


def run_secure_federation(
    grid: Grid, context: Context, coordinator: FederationCoordinator, wait_nodes: Callable[[], list[int]]
) -> dict:
    """All remaining rounds under SecAgg+; returns the final results (raises FederationFailed if none aggregated)."""
    if not coordinator.fed.secure_aggregation:
        raise ValueError("run_secure_federation needs federation.secure_aggregation=true")
    coordinator.start()
    remaining = len(coordinator.remaining_rounds())
    if remaining:
        strategy = SecureRoundStrategy(coordinator, wait_nodes)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        DefaultWorkflow(fit_workflow=secagg_workflow(coordinator))(grid, legacy)
        strategy.close_pending("the SecAgg+ protocol halted (too few sites left to unmask)")
    return coordinator.finish()
