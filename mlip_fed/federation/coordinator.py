"""The server side of a round, without Flower: sample, request, aggregate, evaluate, checkpoint, report.

``server/app.py`` only moves messages; every decision a round makes is here so it is tested with
hand-made ``SiteUpdate``s. One object lives for one ServerApp run; on ``federation.resume=true`` it
starts from the last completed round in the output dir's checkpoint.
"""

from __future__ import annotations

import math
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from mlip_fed.config import ConfigError, ExperimentConfig
from mlip_fed.federation.aggregate import (
    BANK_GLOBAL_KEYS,
    build_server_optimizer,
    merge_site_banks,
    state_nbytes,
    weighted_average,
)
from mlip_fed.federation.client_dp import (
    CLIENT_DP_KEY,
    ClientDPAccountant,
    ClientDPEvent,
    check_history_consistent,
    dp_fedavg,
    noise_generator,
    round_entry,
    settings_from_config,
)
from mlip_fed.federation.payload import RoundRequest, SiteFailure, SiteUpdate
from mlip_fed.federation.report import plot_results, table_header, table_row, write_results
from mlip_fed.federation.run_config import FederationRun
from mlip_fed.federation.secure_payload import SecureAggregate
from mlip_fed.federation.server_state import (
    ServerState,
    check_resumable,
    checkpoint_path,
    load_server_state,
    save_server_state,
)
from mlip_fed.federation.site_evaluation import SiteEvaluatorFn, aggregate_site_evaluations, evaluation_line
from mlip_fed.federation.tensorboard import RoundWriter
from mlip_fed.io import atomic_write_text

#: The run id sent to sites in every request (sites key their privacy-ledger events by it); kept beside the
#: checkpoint so a resumed run keeps its id and a retried round is not charged twice.
RUN_ID_FILE = "run_id.txt"

#: (weights, bank) -> metrics such as {"auroc": .., "r_at_5": ..}; see ``evaluate.ServerEvaluator``.
Evaluator = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict[str, float]]


class FederationFailed(RuntimeError):
    """No round aggregated a single site update: the run produced nothing and must not look successful."""


class FederationCoordinator:
    """Holds the global state between rounds and writes checkpoint, results.json and plot after each."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        output_dir: Path,
        *,
        initial_weights: Mapping[str, Tensor],
        initial_bank: Mapping[str, Tensor],
        evaluator: Evaluator | None = None,
        site_evaluator: SiteEvaluatorFn | None = None,
        num_rounds: int | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        """``evaluator``: the server's own held-out set (``federation.server_evaluation``); ``site_evaluator``: the
        sites' evaluation of the global model on their own splits (``federation.site_evaluation``). Either, both or
        neither run at round 0, every ``evaluate_every`` rounds and at the last round."""
        if not Path(output_dir).is_absolute():
            raise ValueError(f"output dir must be absolute (the ServerApp runs in the SuperLink's cwd): {output_dir}")
        self.cfg = cfg
        self.fed = cfg.federation
        self.output_dir = Path(output_dir)
        self.num_rounds = num_rounds if num_rounds is not None else self.fed.num_rounds
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        self.evaluator = evaluator
        self.site_evaluator = site_evaluator
        self.log = log
        self.optimizer = build_server_optimizer(self.fed.strategy, self.fed.server_lr)
        self.client_dp = settings_from_config(self.fed)  # None unless federation.client_dp; refuses half-configured
        if self.client_dp is not None and cfg.privacy.mechanism == "none":
            raise ConfigError(
                "federation.client_dp=true with privacy.mechanism=none: client-level DP noises only the encoder "
                "update; every site's prototype-bank sums and counts are merged into the released global bank as "
                "they arrive, and without a sample-level policy at the sites nothing covers them (epsilon_c does "
                "not). Set privacy=bucketed (or decomposable), so that each site releases its bank noised and "
                "ledger-accounted, or federation.client_dp=false. (A deployed site whose own privacy.mechanism is "
                "none is not refused here, but its bank statistics are never merged under client DP.)"
            )
        #: round -> (q, expected number of sampled sites q*K) of the Poisson sample ``select_nodes`` drew under client
        #: DP: what the round is accounted with and divided by.
        self._sampling: dict[int, tuple[float, float]] = {}
        config_json = cfg.model_dump(mode="json")
        saved = load_server_state(self.output_dir)
        if saved is not None and not self.fed.resume:
            raise ValueError(
                f"{checkpoint_path(self.output_dir)} exists: set federation.resume=true to continue it, "
                "or choose a new output dir"
            )
        if saved is not None:
            check_resumable(saved.config, config_json, checkpoint_path(self.output_dir))
            self.optimizer.load_state_dict(saved.optimizer)
            self.state = saved
            self.state.config = config_json
            self.log(f"[server] resuming {cfg.name} after round {saved.completed_round} from {self.output_dir}")
            run_id_path = self.output_dir / RUN_ID_FILE
            if not run_id_path.is_file():
                raise ValueError(f"resuming {self.output_dir}: {run_id_path} is missing; DP sites need the same run id")
            self.run_id = run_id_path.read_text().strip()
            check_history_consistent(saved.history, self.client_dp is not None, str(self.output_dir))
        else:
            missing = [k for k in BANK_GLOBAL_KEYS if k not in initial_bank]
            if missing:
                raise ValueError(f"initial bank lacks {missing}")
            self.state = ServerState(
                completed_round=0,
                weights={k: v.detach().cpu().clone() for k, v in initial_weights.items()},
                bank={k: v.detach().cpu().clone() for k, v in initial_bank.items()},
                optimizer=self.optimizer.state_dict(),
                config=config_json,
            )
            self.run_id = f"{cfg.name}-{uuid.uuid4().hex[:12]}"  # a fresh run: new ledger keys at every site
            atomic_write_text(self.output_dir / RUN_ID_FILE, self.run_id + "\n")
        self.client_dp_accountant = (
            ClientDPAccountant.from_history(self.state.history, self.client_dp.delta) if self.client_dp else None
        )
        #: ``train.tensorboard``: each round's record also goes to ``<output_dir>/tensorboard`` (round, eval, per-site,
        #: epsilon, bytes and seconds scalars); results.json stays the record.
        self.tensorboard = RoundWriter(self.output_dir) if cfg.train.tensorboard else None

    # ------------------------------------------------------------------ round life cycle
    def remaining_rounds(self) -> range:
        return range(self.state.completed_round + 1, self.num_rounds + 1)

    def start(self) -> None:
        """Evaluate the initial model as round 0 (the random-init baseline) and print the table header."""
        self.log(table_header())
        if self.state.completed_round == 0 and not self.state.history:
            record: dict[str, Any] = {"round": 0, "aggregated": False, "num_sampled": 0, "num_updates": 0}
            if self.evaluator is not None or self.site_evaluator is not None:
                seconds = self._evaluate(0, record)
                record["seconds"] = {"evaluation": seconds, "round": seconds}
            self.state.history.append(record)
            self._persist("running")
            if self.tensorboard is not None:
                self.tensorboard.write(record)
            self.log(table_row(record))
        else:
            for record in self.state.history:
                self.log(table_row(record))

    def select_nodes(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        """The round's sites.

        Without client-level DP: a sample of ``max(min_train_nodes, ceil(fraction_train * available))`` nodes, seeded by
        (seed, round) for reproducible runs. Under client-level DP: the sample the accountant charges, a **Poisson**
        sample in which every available node is included independently with probability q = ``fraction_train``
        (``min_train_nodes`` does not apply: enforcing a minimum would change the distribution), drawn from the
        server's OS entropy, since the seed is in every site's config
        (``federation.client_dp_insecure_reproducible_noise`` keeps it seeded). The round then divides by the
        fixed expected count q*K, not by the realised one, and is released even when the sample is empty.
        """
        available = sorted(int(n) for n in node_ids)
        if not available:
            raise ValueError(f"round {server_round}: no nodes connected")
        if self.client_dp is not None:
            q = self.fed.fraction_train
            insecure = self.fed.client_dp_insecure_reproducible_noise
            rng = random.Random(self.cfg.seed * 100_003 + server_round) if insecure else secrets.SystemRandom()
            self._sampling[server_round] = (q, q * len(available))
            return [n for n in available if q >= 1.0 or rng.random() < q]
        wanted = max(self.fed.min_train_nodes, math.ceil(self.fed.fraction_train * len(available)))
        wanted = min(wanted, len(available))
        return sorted(random.Random(self.cfg.seed * 100_003 + server_round).sample(available, wanted))

    def evaluation_request(self, server_round: int) -> RoundRequest:
        """What the sites evaluate: the global model and bank after ``server_round`` (0: the initial model)."""
        return RoundRequest(
            server_round=server_round,
            weights=self.state.weights,
            bank={k: self.state.bank[k] for k in BANK_GLOBAL_KEYS},
            config={"server-round": server_round, "run-id": self.run_id, "num-rounds": self.num_rounds},
        )

    def round_request(self, server_round: int) -> RoundRequest:
        return RoundRequest(
            server_round=server_round,
            weights=self.state.weights,
            bank={k: self.state.bank[k] for k in BANK_GLOBAL_KEYS},
            config={
                "server-round": server_round,
                "run-id": self.run_id,
                "num-rounds": self.num_rounds,
                "local-epochs": self.fed.local_epochs,
                "strategy": self.fed.strategy,
                "proximal-mu": self.fed.proximal_mu if self.fed.strategy == "fedprox" else 0.0,
            },
        )

    def complete_round(
        self,
        server_round: int,
        updates: Sequence[SiteUpdate],
        failures: Sequence[SiteFailure],
        *,
        num_sampled: int,
        communication_seconds: float = math.nan,
    ) -> dict[str, Any]:
        """Aggregate what arrived, evaluate, checkpoint, append to results; returns the round's record."""
        self._open_round(server_round, failures)
        t_agg = time.perf_counter()
        record: dict[str, Any] = {
            "round": server_round,
            "num_sampled": num_sampled,
            "num_updates": len(updates),
            "aggregated": bool(updates),
            "sites": [
                {"site_id": u.site_id, "num_examples": u.num_examples, **{k: float(v) for k, v in u.metrics.items()}}
                for u in updates
            ],
            "failures": [f.as_dict() for f in failures],
        }
        epsilons = {u.site_id: float(u.metrics["epsilon"]) for u in updates if "epsilon" in u.metrics}
        if epsilons:  # each DP site's own sample-level epsilon after this round (public ledger parameters)
            record["epsilon"] = epsilons
        # A Poisson-sampled client-DP round is released (noise only, if need be) whatever arrives: skipping it would
        # reveal that nobody was sampled or answered, outside the mechanism the accountant charges.
        sampled_dp_round = self.client_dp is not None and server_round in self._sampling
        if updates or sampled_dp_round:
            record["aggregated"] = True
            weights = [float(u.num_examples) for u in updates]
            if self.client_dp is not None:
                averaged = self._client_dp_average(server_round, updates, num_sampled, record)
            else:
                averaged = weighted_average([u.weights for u in updates], weights)
            self.state.weights = self.optimizer.step(self.state.weights, averaged)
            banks = [u.bank_stats for u in updates]
            if self.client_dp is not None:  # epsilon_c does not cover the bank: merge only sample-level DP releases
                excluded = [u.site_id for u in updates if "epsilon" not in u.metrics]
                if excluded:
                    record["bank_excluded"] = excluded
                    self.log(
                        f"[server] round {server_round}: bank statistics of {excluded} not merged: under client DP only "
                        "a site's noised, ledger-accounted release (privacy.mechanism bucketed/decomposable) is merged"
                    )
                banks = [u.bank_stats for u in updates if "epsilon" in u.metrics]
            bank, updated = merge_site_banks(self.state.bank, banks, self.fed.bank_min_count)
            self.state.bank = bank
            record["bank_updated"] = int(updated.sum())
            reported = [
                (u.metrics["train_loss"], w) for u, w in zip(updates, weights, strict=True) if "train_loss" in u.metrics
            ]
            if reported:  # DP sites do not send a training loss (it is not accounted)
                record["train_loss"] = sum(v * w for v, w in reported) / sum(w for _, w in reported)
        else:
            self.log(f"[server] round {server_round}: no site update arrived; global model unchanged")
        return self._close_round(
            server_round,
            record,
            failures,
            aggregation_s=time.perf_counter() - t_agg,
            up_weights=[state_nbytes(u.weights) for u in updates],
            up_bank=[state_nbytes(u.bank_stats) for u in updates],
            site_train=[u.metrics.get("train_seconds", math.nan) for u in updates],
            site_handler=[u.metrics.get("handler_seconds", math.nan) for u in updates],
            num_sampled=num_sampled,
            communication_seconds=communication_seconds,
        )

    def complete_secure_round(
        self,
        server_round: int,
        aggregate: SecureAggregate | None,
        failures: Sequence[SiteFailure],
        *,
        num_sampled: int,
        site_ids: Sequence[str] = (),
        site_metrics: Sequence[Mapping[str, float]] = (),
        up_bytes_per_site: int = 0,
        communication_seconds: float = math.nan,
    ) -> dict[str, Any]:
        """A SecAgg+ round: the same optimiser step, bank merge, evaluation, checkpoint and results as
        ``complete_round``, fed with the unmasked sum instead of per-site updates (``secure_payload``).

        The record names the contributing sites but carries no per-site example count or loss: the server never
        had them. ``aggregate=None``: the protocol aborted (too few sites left to unmask); the model is unchanged.
        """
        self._open_round(server_round, failures)
        if self.client_dp is not None:
            raise ValueError("federation.client_dp needs each site's update at the server; it cannot run under SecAgg+")
        t_agg = time.perf_counter()
        contributed = aggregate is not None and aggregate.num_sites > 0
        record: dict[str, Any] = {
            "round": server_round,
            "num_sampled": num_sampled,
            "num_updates": aggregate.num_sites if aggregate is not None else 0,
            "aggregated": contributed,
            "secure_aggregation": True,
            "sites": [
                {"site_id": s, **{k: float(v) for k, v in m.items()}}
                for s, m in zip(site_ids, site_metrics, strict=True)
            ],
            "failures": [f.as_dict() for f in failures],
        }
        epsilons = {s: float(m["epsilon"]) for s, m in zip(site_ids, site_metrics, strict=True) if "epsilon" in m}
        if epsilons:
            record["epsilon"] = epsilons
        if aggregate is not None and contributed:
            record["total_examples"] = aggregate.total_examples
            self.state.weights = self.optimizer.step(self.state.weights, aggregate.weights)
            bank, updated = merge_site_banks(self.state.bank, [aggregate.bank_stats], self.fed.bank_min_count)
            self.state.bank = bank
            record["bank_updated"] = int(updated.sum())
            if aggregate.train_loss is not None:
                record["train_loss"] = aggregate.train_loss
        else:
            self.log(f"[server] round {server_round}: secure aggregation produced no sum; global model unchanged")
        num = aggregate.num_sites if contributed and aggregate is not None else 0
        return self._close_round(
            server_round,
            record,
            failures,
            aggregation_s=time.perf_counter() - t_agg,
            up_weights=[up_bytes_per_site] * num,
            up_bank=[0] * num,  # the bank travels inside the masked vector counted in up_weights_per_site
            site_train=[m.get("train_seconds", math.nan) for m in site_metrics],
            site_handler=[m.get("handler_seconds", math.nan) for m in site_metrics],
            num_sampled=num_sampled,
            communication_seconds=communication_seconds,
        )

    def _open_round(self, server_round: int, failures: Sequence[SiteFailure]) -> None:
        if server_round != self.state.completed_round + 1:
            raise ValueError(
                f"round {server_round} completed out of order (last completed {self.state.completed_round})"
            )
        for failure in failures:  # a refusal by a site's privacy policy included: log it, carry on with the others
            what = "refused the round" if failure.refused else "left out"
            self.log(
                f"[server] round {server_round}: site {failure.site_id} (node {failure.node_id}) {what}: {failure.reason}"
            )

    def _close_round(
        self,
        server_round: int,
        record: dict[str, Any],
        failures: Sequence[SiteFailure],
        *,
        aggregation_s: float,
        up_weights: list[int],
        up_bank: list[int],
        site_train: list[float],
        site_handler: list[float],
        num_sampled: int,
        communication_seconds: float,
    ) -> dict[str, Any]:
        """Evaluate, account bytes and seconds, checkpoint and append the record: shared by plain and secure rounds."""
        evaluation_s = 0.0
        if record["aggregated"] and self._evaluate_this_round(server_round):
            evaluation_s = self._evaluate(server_round, record)

        down_weights = state_nbytes(self.state.weights)
        down_bank = state_nbytes({k: self.state.bank[k] for k in BANK_GLOBAL_KEYS})
        record["bytes"] = {
            "down_weights_per_site": down_weights,
            "down_bank_per_site": down_bank,
            "up_weights_per_site": up_weights,
            "up_bank_per_site": up_bank,
            "total": num_sampled * (down_weights + down_bank) + sum(up_weights) + sum(up_bank),
        }
        handler_max = max(site_handler) if site_handler else 0.0
        record["seconds"] = {
            "communication": communication_seconds,
            "local_train_max": max(site_train) if site_train else 0.0,
            "local_train_sum": sum(site_train),
            "site_handler_max": handler_max,
            "aggregation": aggregation_s,
            "evaluation": evaluation_s,
            # send_and_receive wall time not spent in the slowest site's handler: message transport,
            # ClientApp start-up and, when sites outnumber parallel workers, queueing.
            "flower_overhead": communication_seconds - handler_max,
            "round": communication_seconds + aggregation_s + evaluation_s,
        }
        self.state.completed_round = server_round
        self.state.optimizer = self.optimizer.state_dict()
        self.state.history.append(record)
        self.state.failures.extend(f.as_dict() for f in failures)
        self._persist("running")
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        self.log(table_row(record))
        return record

    def finish(self) -> dict[str, Any]:
        """Write the final results and plot; raise FederationFailed when nothing was ever aggregated."""
        aggregated = [r for r in self.state.history if r.get("aggregated")]
        status = "completed" if aggregated else "failed"
        summary = self._persist(status)
        try:
            plot_results(self.output_dir, self.state.history, f"{self.cfg.name}: {self.fed.strategy}")
        except Exception as err:  # the plot is a convenience; results.json is the record
            self.log(f"[server] could not write plot: {type(err).__name__}: {err}")
        self.log(
            f"[server] {status}: {len(aggregated)}/{len(self.state.history) - 1} rounds aggregated, "
            f"{len(self.state.failures)} site failure(s); results in {self.output_dir}"
        )
        for failure in self.state.failures:
            self.log(
                f"[server]   failure round {failure['round']} site {failure['site_id']} "
                f"(node {failure['node_id']}): {failure['reason']}"
            )
        if not aggregated:
            raise FederationFailed(
                f"no round aggregated any site update ({len(self.state.failures)} failure(s)); see "
                f"{self.output_dir / 'results.json'}"
            )
        return summary

    def _client_dp_average(
        self, server_round: int, updates: Sequence[SiteUpdate], num_sampled: int, record: dict[str, Any]
    ) -> dict[str, Tensor]:
        """DP-FedAvg over the sampled sites; charges the round and writes ``record["client_dp"]``.

        Sampled by ``select_nodes`` (Poisson at q = fraction_train over K available nodes): accounted at q, divided
        by the fixed q*K. A round not sampled by ``select_nodes`` (the in-process simulation, where every site takes
        part) claims no amplification (q = 1) and divides by the number of sites asked.
        """
        assert self.client_dp is not None and self.client_dp_accountant is not None
        sample_rate, expected = self._sampling.pop(server_round, (1.0, float(num_sampled)))
        insecure = self.fed.client_dp_insecure_reproducible_noise
        if insecure:
            self.log(
                f"[server] round {server_round}: WARNING federation.client_dp_insecure_reproducible_noise=true: the "
                "client-DP noise is derived from the experiment seed and the round, which every site knows; this "
                "round's client-level epsilon is NOT PRIVATE (debugging only)"
            )
        result = dp_fedavg(
            self.state.weights,
            [u.weights for u in updates],
            self.client_dp,
            expected_sites=expected,
            generator=noise_generator(self.cfg.seed if insecure else None, server_round),  # secret unless debugging
        )
        self.client_dp_accountant.record(ClientDPEvent(server_round, self.client_dp.noise_multiplier, sample_rate))
        record[CLIENT_DP_KEY] = round_entry(result, self.client_dp, sample_rate, self.client_dp_accountant)
        record[CLIENT_DP_KEY]["noise_source"] = "insecure_reproducible" if insecure else "os_entropy"
        return result.weights

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, server_round: int, record: dict[str, Any]) -> float:
        """The server's evaluation into ``record["eval"]``, the sites' into ``record["site_eval"]``; returns seconds.

        A site that fails, refuses (its policy) or times out is named in ``site_eval.failures`` and left out of the
        aggregate, as in training; the round itself is not affected.
        """
        t0 = time.perf_counter()
        if self.evaluator is not None:
            record["eval"] = self.evaluator(self.state.weights, self.state.bank)
        if self.site_evaluator is not None:
            evaluations, failures = self.site_evaluator(self.evaluation_request(server_round))
            record["site_eval"] = aggregate_site_evaluations(evaluations, failures)
            self.log(evaluation_line(server_round, record["site_eval"]))
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ persistence
    def _evaluate_this_round(self, server_round: int) -> bool:
        every = self.fed.evaluate_every
        return server_round == self.num_rounds or (every > 0 and server_round % every == 0)

    def _persist(self, status: str) -> dict[str, Any]:
        save_server_state(self.state, self.output_dir)
        baseline = (
            self.state.history[0].get("eval") if self.state.history and self.state.history[0]["round"] == 0 else None
        )
        evaluated = [r for r in self.state.history if r["round"] > 0 and "eval" in r]
        site_evaluated = [r for r in self.state.history if r["round"] > 0 and "site_eval" in r]
        first = self.state.history[0] if self.state.history and self.state.history[0]["round"] == 0 else {}
        payload = {
            "experiment": self.cfg.name,
            "status": status,
            "strategy": self.fed.strategy,
            "num_rounds": self.num_rounds,
            "completed_rounds": self.state.completed_round,
            "aggregated_rounds": sum(1 for r in self.state.history if r.get("aggregated")),
            "baseline_eval": baseline,
            "final_eval": evaluated[-1]["eval"] if evaluated else None,
            # the sites' own evaluation (``federation.site_evaluation``): aggregate metrics of round 0 and the last
            "baseline_site_eval": first.get("site_eval", {}).get("metrics"),
            "final_site_eval": site_evaluated[-1]["site_eval"]["metrics"] if site_evaluated else None,
            "rounds": self.state.history,
            "failures": self.state.failures,
            "checkpoint": str(checkpoint_path(self.output_dir)),
            "config": self.state.config,
        }
        write_results(self.output_dir, payload)
        return payload


def coordinator_from_run(
    run: FederationRun, log: Callable[[str], None] = print, site_evaluator: SiteEvaluatorFn | None = None
) -> FederationCoordinator:
    """Build the initial model (identical at every site: same seed), the evaluators and the coordinator.

    The server's own evaluator is built only with ``federation.server_evaluation`` (it reads the server experiment's
    held-out data); ``site_evaluator`` (how to reach the sites: Flower messages or direct calls) is used only with
    ``federation.site_evaluation``.
    """
    from mlip_fed.federation.evaluate import ServerEvaluator
    from mlip_fed.federation.site import initial_global_state

    cfg = run.cfg
    fed = cfg.federation
    weights, bank, model = initial_global_state(cfg)
    evaluator = ServerEvaluator.from_config(cfg, model, log=log) if fed.server_evaluation else None
    where = [w for w, on in (("server", evaluator is not None), ("sites", fed.site_evaluation)) if on]
    every = f"every {fed.evaluate_every} round(s), " if fed.evaluate_every else ""
    log(
        f"[server] {cfg.name}: {run.num_rounds} round(s), strategy {fed.strategy}, output {run.output_dir}; "
        + (f"evaluation at the {' and the '.join(where)}: round 0, {every}last round" if where else "no evaluation")
    )
    return FederationCoordinator(
        cfg,
        run.output_dir,
        initial_weights=weights,
        initial_bank=bank,
        evaluator=evaluator,
        site_evaluator=site_evaluator if fed.site_evaluation else None,
        num_rounds=run.num_rounds,
        log=log,
    )
