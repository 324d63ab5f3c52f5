"""One hospital's side of a round: load the global model and bank, train locally, release weights and bank stats.

Used by the ClientApp in simulation (partition id -> SynthCXR hospital) and, next, by the deployed
``mlip-client``. Under a DP policy (``privacy.mechanism`` bucketed or decomposable) a round goes through
the site's ``SitePrivacy``: its ledger in ``state_dir``, a policy check before any training (a refused
round raises ``RoundRefused``; the ClientApp replies with the reason), Poisson sampling of patients,
the DP gradient, and a noised prototype-bank release, all with secret randomness (OS entropy at the site); a
round is released once per request (stored reply on retry); see docs/privacy.md "DP in the federation". The trainer is the same ``LocalTrainer`` that ``mlip-pretrain`` uses. State that
must outlive a process -- the trainer checkpoint (optimiser moments, schedule, counters) and the
bank history -- lives in the site's own ``state_dir``; nothing depends on Flower's in-memory
``context.state``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mlip_fed.config import ExperimentConfig, PrivacyPolicy
from mlip_fed.federation.aggregate import BANK_STAT_KEYS
from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteUpdate
from mlip_fed.federation.reply_store import ReplyStore, exclusive
from mlip_fed.io import append_jsonl
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.privacy.ledger import LEDGER_FILENAME
from mlip_fed.train.trainer import GradientFn, LocalTrainer, LossValue, standard_gradient

TRAINER_CHECKPOINT = "trainer_round_{:04d}.pt"
#: The site's privacy ledger, in its state dir: it outlives rounds, runs and restarts.
PRIVACY_LEDGER = LEDGER_FILENAME
#: Ledger meta key holding, per run id, the noise multiplier calibrated once for that run's whole schedule.
CALIBRATION_META = "calibration"


class RoundRefused(RuntimeError):
    """The site's privacy policy refuses this round (budget, delta > 1/N, noise below minimum); nothing was trained."""

    def __init__(self, site_id: str, server_round: int, reason: str) -> None:
        super().__init__(f"round {server_round} {reason}")
        self.site_id = site_id
        self.server_round = server_round
        self.reason = reason


def privacy_overrides(config: Mapping[str, Any]) -> list[str]:
    """Request keys that try to set a privacy field. The site ignores them: its policy is its own (docs/architecture.md, invariant 3)."""
    fields = set(PrivacyPolicy.model_fields)
    found = []
    for key in config:
        norm = key.replace("-", "_")
        if norm.startswith("privacy") or norm.split(".")[-1] in fields:
            found.append(key)
    return sorted(found)


# ---------------------------------------------------------------------------- builders
def initial_global_state(cfg: ExperimentConfig) -> tuple[dict[str, Tensor], dict[str, Tensor], Any]:
    """Round-0 weights and bank: the seeded initial model every site would also build."""
    from mlip_fed.pipeline import build_model

    model = build_model(cfg)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return weights, model.prototype_bank.state_dict(), model


# ---------------------------------------------------------------------------- FedProx
def proximal_gradient(global_weights: Mapping[str, Tensor], mu: float, max_grad_norm: float | None) -> GradientFn:
    """FedProx: the local loss plus ``mu/2 * ||w - w_global||^2``, added as its gradient ``mu * (w - w_global)``.

    The trainer clips only its own ``standard_gradient``, so this gradient function clips itself
    (per micro-batch, which equals per step with ``grad_accum_steps=1``).
    """
    anchors: dict[str, Tensor] = {}

    def gradient(model: nn.Module, batch: dict[str, Any], loss_scale: float) -> dict[str, LossValue]:
        parts = standard_gradient(model, batch, loss_scale)
        proximal: LossValue = 0.0  # a device tensor once a parameter is seen: no per-parameter device-to-host copy
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not param.requires_grad or param.grad is None:
                    continue
                anchor = anchors.get(name)
                if anchor is None or anchor.device != param.device:
                    anchor = anchors[name] = global_weights[name].to(param.device, param.dtype)
                diff = param - anchor
                param.grad.add_(diff, alpha=mu * loss_scale)
                proximal = proximal + diff.pow(2).sum().double()
            if max_grad_norm is not None:
                parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        parts["proximal"] = 0.5 * mu * proximal
        return parts

    return gradient


# ---------------------------------------------------------------------------- bank statistics
@torch.no_grad()
def accumulate_bank(
    model: Any, loader: DataLoader, device: torch.device, unit_key: str | None = None
) -> tuple[PrototypeBank, int]:
    """Per-category sums of unit-norm image/text embeddings and member counts over the site's train split.

    ``unit_key=None`` (no DP): every study adds its embeddings and 1 to each positive category; the second value is
    the largest number of positive categories of one study. With a privacy unit (``unit_key`` patient_id or study_id,
    the DP release): each unit's studies are AVERAGED per category first, so a unit adds at most 1 to every row and
    count it touches (``mlip_fed.privacy.bank_bound``: a patient with k studies positive for one category would
    otherwise move that row by k, beyond the release's accounted sensitivity); the second value is then the largest
    number of distinct positive categories of one unit, which must stay within the public
    ``privacy.prototype_contribution_bound``.

    One eval-mode pass after local training, so every member is embedded by the same weights that
    are sent back (during training the weights move under the running sums).
    """
    from mlip_fed.privacy.bank_bound import UnitCategoryMeans

    bank = PrototypeBank(dim=model.prototype_bank.dim, categories=model.prototype_bank.categories)
    means = UnitCategoryMeans(len(bank.categories), bank.dim) if unit_key is not None else None
    largest = 0
    was_training = model.training
    model.train(False)
    try:
        for batch in loader:
            if batch is None:
                continue
            image = model.encode_image(batch["image"].to(device)).embedding
            text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).embedding
            if means is None:
                bank.accumulate(image, text, batch["labels"])
                largest = max([largest, *(batch["labels"] == 1.0).sum(dim=1).tolist()])
            else:
                means.add(image, text, batch["labels"], [str(u) for u in batch[unit_key]])
    finally:
        model.train(was_training)
    if means is not None:
        sum_image, sum_text, count, largest = means.totals()
        bank.sum_image.copy_(sum_image)
        bank.sum_text.copy_(sum_text)
        bank.count.copy_(count)
    return bank, int(largest)


def bank_statistics(model: Any, loader: DataLoader, device: torch.device) -> dict[str, Tensor]:
    """The raw (non-DP) statistics the site sends when it trains without a DP policy."""
    state = accumulate_bank(model, loader, device)[0].state_dict()
    return {k: state[k] for k in BANK_STAT_KEYS}


# ---------------------------------------------------------------------------- the site
class SiteRuntime:
    """A hospital's data, model and on-disk state; ``train_round`` answers one server request."""

    def __init__(
        self, cfg: ExperimentConfig, site_index: int | None, state_dir: Path, log: Callable[[str], None] = print
    ) -> None:
        """``site_index=None`` trains on the pooled data: a one-site federation that is centralized training
        with the very same trainer, rounds and bank statistics (the benchmarks' baseline)."""
        from mlip_fed.pipeline import (
            build_collator,
            build_model,
            eval_dataset,
            load_records,
            loader_options,
            train_dataset,
            train_loader,
        )

        if cfg.privacy.mechanism != "none" and cfg.train.grad_accum_steps != 1:
            raise ValueError(
                f"privacy.mechanism={cfg.privacy.mechanism!r} with train.grad_accum_steps={cfg.train.grad_accum_steps}: "
                "under DP every micro-batch is its own noised step; set train.grad_accum_steps=1"
            )
        self.cfg = cfg
        self.site_index = site_index
        self.site_id = "central" if site_index is None else f"site_{site_index}"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        # The model first: pretrained weights (the site's own copy, see SiteConfig) are checked before any data.
        self.model = build_model(cfg)
        for report in self.model.weight_reports:
            log(f"[{self.site_id}] weights: {report.summary()}")
        data = load_records(cfg.data, site_index)
        if data.skips.total_skipped:
            log(f"[{self.site_id}] skipped records:\n{data.skips.summary()}")
        self.num_train = len(data.train)
        self._eval_records = (data.train, data.test)  # the site's own evaluation (``evaluate_round``), built lazily
        self._evaluator: Any = None
        collator = build_collator(self.model, cfg)
        self.collator = collator
        self.train_data = train_dataset(data.train, cfg)
        self.loader = train_loader(self.train_data, collator, cfg)
        #: Under DP: patients (or records) are the privacy unit; q = expected batch / units, a public schedule.
        self.patient_ids = [r.patient_id for r in data.train]
        unit_keys = self.patient_ids if cfg.privacy.privacy_unit == "patient" else [r.study_id for r in data.train]
        self.num_units = len(set(unit_keys))
        self.sample_rate = min(1.0, cfg.train.batch_size / max(1, self.num_units))
        #: Loaders used once per round (the DP Poisson loader, the bank-statistics pass) get workers too, not
        #: persistent: idle workers would hold the site's memory between rounds.
        self.round_loader_options = {**loader_options(cfg), "persistent_workers": False} if cfg.data.num_workers else {}
        # Eval transforms (no randomness) and a fixed order: workers change nothing but the speed.
        self.stats_loader = DataLoader(
            eval_dataset(data.train, cfg),
            batch_size=cfg.train.batch_size,
            shuffle=False,
            collate_fn=collator,
            **self.round_loader_options,
        )

    @property
    def dp(self) -> bool:
        return self.cfg.privacy.mechanism != "none"

    def steps_per_round(self, local_epochs: int) -> int:
        from mlip_fed.pipeline import steps_per_epoch

        if self.dp:  # Poisson loader: int(1/q) steps per epoch
            per_round = max(1, int(1 / self.sample_rate)) * local_epochs
        else:
            per_round = steps_per_epoch(self.num_train, self.cfg) * local_epochs
        if self.cfg.train.max_steps is not None:  # in federation, max_steps bounds one round
            per_round = min(per_round, self.cfg.train.max_steps)
        return per_round

    def train_round(self, request: RoundRequest) -> SiteUpdate:
        t_start = time.perf_counter()
        server_round = request.server_round
        ignored = privacy_overrides(request.config)
        if ignored:  # the server may ask for training; it cannot loosen this site's policy
            self.log(f"[{self.site_id}] round {server_round}: ignoring privacy settings in the request: {ignored}")
        local_epochs = int(request.config.get("local-epochs", self.cfg.federation.local_epochs))
        num_rounds = int(request.config.get("num-rounds", self.cfg.federation.num_rounds))
        mu = float(request.config.get("proximal-mu", 0.0))
        per_round = self.steps_per_round(local_epochs)
        if self.dp:
            return self._train_round_dp(request, local_epochs, num_rounds, mu, per_round, t_start)

        gradient_fn = (
            proximal_gradient(request.weights, mu, self.cfg.train.max_grad_norm) if mu > 0 else standard_gradient
        )
        trainer = self._trainer(request, gradient_fn, per_round, num_rounds)
        t_train = time.perf_counter()
        summary = trainer.fit(self.loader, epochs=local_epochs)
        train_seconds = time.perf_counter() - t_train
        t_ckpt = time.perf_counter()
        self._save_trainer(trainer, server_round)
        checkpoint_seconds = time.perf_counter() - t_ckpt

        t_bank = time.perf_counter()
        stats = bank_statistics(self.model, self.stats_loader, trainer.device)
        bank_seconds = time.perf_counter() - t_bank
        append_jsonl(
            self.state_dir / "bank_history.jsonl",
            {"round": server_round, "count": stats["count"].tolist(), "steps": summary.steps},
        )
        metrics = {
            "train_loss": summary.mean_parts.get("total", math.nan),
            "train_steps": float(summary.steps),
            "train_samples": float(summary.samples),
            "train_seconds": train_seconds,
            # where the rest of the handler goes (bench/flower_overhead.py): the trainer checkpoint, the bank pass
            "checkpoint_seconds": checkpoint_seconds,
            "bank_seconds": bank_seconds,
            "handler_seconds": time.perf_counter() - t_start,
        }
        metrics.update({f"loss_{k}": v for k, v in summary.mean_parts.items() if k not in ("total", "grad_norm")})
        self.log(
            f"[{self.site_id}] round {server_round}: {summary.samples} examples, {summary.steps} steps, loss "
            f"{metrics['train_loss']:.4f}, trained in {train_seconds:.1f} s (handler {metrics['handler_seconds']:.1f} s)"
        )
        return SiteUpdate(self.site_id, self.num_train, self._weights(), stats, metrics)

    # ------------------------------------------------------------------ evaluation
    def evaluate_round(self, request: RoundRequest) -> SiteEvaluation:
        """Score the request's global model on this site's own test split (``federation/site_evaluation.py``).

        Refused (``refused (evaluation)``) where the site's policy does not release evaluation metrics: they are
        computed on its data and no accountant charges them (by default refused under DP). The site's trainer state is
        untouched: the next training round restores it and loads the global model again.
        """
        from mlip_fed.federation.site_evaluation import SiteEvaluator

        server_round = request.server_round
        policy = self.cfg.privacy
        if not policy.evaluation_released:
            reason = (
                f"refused (evaluation): this site's policy does not release evaluation metrics (privacy.mechanism="
                f"{policy.mechanism}, release_evaluation={policy.release_evaluation}); they are computed on its data "
                "and no accountant charges them"
            )
            self.log(f"[{self.site_id}] round {server_round}: {reason}")
            raise RoundRefused(self.site_id, server_round, reason)
        if self.dp:
            self.log(
                f"[{self.site_id}] round {server_round}: WARNING privacy.release_evaluation=true: evaluation metrics "
                "leave this site outside its epsilon (not charged to the ledger)"
            )
        t0 = time.perf_counter()
        if self._evaluator is None:
            train, test = self._eval_records
            self._evaluator = SiteEvaluator(self.cfg, self.model, train, test, self.site_id)
        self._load_global(request)
        metrics = self._evaluator()
        seconds = time.perf_counter() - t0
        self.log(
            f"[{self.site_id}] round {server_round}: evaluated on {self._evaluator.n_test} test studies "
            f"(probe on {self._evaluator.n_probe_train}): AUROC {metrics.get('auroc', math.nan):.4f}, "
            f"R@5 {metrics.get('r_at_5', math.nan):.4f} in {seconds:.1f} s"
        )
        return SiteEvaluation(self.site_id, self._evaluator.n_test, metrics)

    # ------------------------------------------------------------------ DP round
    def _train_round_dp(
        self, request: RoundRequest, local_epochs: int, num_rounds: int, mu: float, per_round: int, t_start: float
    ) -> SiteUpdate:
        """Policy check, DP training, ledger charge, noised bank release; only accounted values leave the site.

        Sent: weights (DP-SGD output), the noised bank (charged), the site's current epsilon and the public
        schedule (sigma, q, steps, delta). Not sent: train loss and per-objective losses, the realised sample
        count, train/handler seconds (not accounted); ``num_examples`` is the public expected count q * N * steps.
        An error reply carries only a public code (``payload.format_site_error(private=True)``).

        Each (run, round) is released once, for one request (weights, bank and config digest): the reply is stored
        in ``state_dir`` before it leaves, a retry of the same request gets it back byte for byte, another request
        for that round is refused (``refused (replay)``); see ``federation.reply_store``, ``privacy.request_claims``.
        """
        from mlip_fed.privacy.ledger import LedgerMissing, check_ledger_continuity
        from mlip_fed.privacy.randomness import INSECURE_WARNING
        from mlip_fed.privacy.request_claims import request_digest

        server_round = request.server_round
        run_id = request.config.get("run-id")
        if not run_id:
            raise ValueError(
                f"[{self.site_id}] round {server_round}: the request carries no 'run-id'; a DP site needs it to key "
                "its ledger events (a retried round must not be charged twice)"
            )
        run_id = str(run_id)
        if mu > 0:
            raise ValueError(
                f"[{self.site_id}] proximal-mu={mu} (FedProx) is not wired into the DP gradient; use fedavg or fedadam"
            )
        if self.cfg.privacy.insecure_reproducible_noise:
            self.log(f"[{self.site_id}] round {server_round}: WARNING {INSECURE_WARNING}")
        try:  # a deleted ledger must not restart the budget at 0 (before anything opens, and so creates, the ledger)
            check_ledger_continuity(self.state_dir)
        except LedgerMissing as err:
            self.log(f"[{self.site_id}] round {server_round}: {err}")
            raise RoundRefused(self.site_id, server_round, f"refused (ledger): {err}") from err
        # One round, one release: a retry of the same request gets the stored reply, another request is refused.
        digest = request_digest(request.weights, request.bank, request.config)
        replies = ReplyStore(self.state_dir, run_id)
        with exclusive(self.state_dir):
            stored = self._stored_reply(replies, run_id, server_round, digest)
            if stored is not None:
                self.log(f"[{self.site_id}] round {server_round}: same request again; sending the stored reply")
                return stored
            update = self._compute_round_dp(request, run_id, digest, local_epochs, num_rounds, per_round, t_start)
            replies.save(server_round, digest, update)  # before the reply can leave the site
            self._mark_replied(run_id, server_round, digest)
            replies.prune(keep_from=server_round - 1)
        return update

    def _stored_reply(self, replies: ReplyStore, run_id: str, server_round: int, digest: str) -> SiteUpdate | None:
        """The reply already released for this exact request; refuse another request for an answered round."""
        from mlip_fed.privacy.ledger import PrivacyLedger
        from mlip_fed.privacy.request_claims import RequestClaims, conflict_reason

        with PrivacyLedger(self.state_dir / PRIVACY_LEDGER) as ledger:
            claim = RequestClaims(ledger).lookup(run_id, server_round)
        if claim is None:
            return None
        if claim.digest != digest:
            reason = f"refused (replay): {conflict_reason(run_id, server_round, claim.digest, digest)}"
            self.log(f"[{self.site_id}] round {server_round}: {reason}")
            raise RoundRefused(self.site_id, server_round, reason)
        stored = replies.load(server_round, digest)
        if stored is None and claim.replied:
            raise RoundRefused(
                self.site_id,
                server_round,
                f"refused (replay): run {run_id!r} round {server_round} was answered and its reply is no longer "
                "stored; a site does not compute a released round again",
            )
        return stored  # None: the round never produced a reply (crash), so nothing left the site: run it

    def _mark_replied(self, run_id: str, server_round: int, digest: str) -> None:
        from mlip_fed.privacy.ledger import PrivacyLedger
        from mlip_fed.privacy.request_claims import RequestClaims

        with PrivacyLedger(self.state_dir / PRIVACY_LEDGER) as ledger:
            RequestClaims(ledger).mark_replied(run_id, server_round, digest)

    def _compute_round_dp(
        self,
        request: RoundRequest,
        run_id: str,
        digest: str,
        local_epochs: int,
        num_rounds: int,
        per_round: int,
        t_start: float,
    ) -> SiteUpdate:
        """Policy check, claim the request, DP training, ledger charge and the noised bank release."""
        from mlip_fed.privacy.randomness import public_seed
        from mlip_fed.privacy.request_claims import RequestConflict
        from mlip_fed.privacy.site_privacy import PrivacyRefused, SitePrivacy

        server_round = request.server_round
        policy, q = self.cfg.privacy, self.sample_rate
        # The public round seed is used ONLY under privacy.insecure_reproducible_noise; otherwise SitePrivacy draws
        # every DP seed (noise, Poisson sample, release) and sp.seed (dropout, ITM negatives) from OS entropy.
        public = public_seed(self.cfg.seed, self.site_id, run_id, server_round)
        sp = SitePrivacy(
            policy, self.state_dir / PRIVACY_LEDGER, self.num_units, run_id, site=self.site_id, seed=public
        )
        try:
            self._noise_for_run(sp, server_round, run_id, q, per_round * num_rounds, num_rounds)
            retry = any(
                e.run_id == run_id and e.round == server_round and e.kind == "train" for e in sp.ledger.events()
            )
            if not retry:  # charged already by an attempt that crashed before its reply existed: nothing new leaves
                refusal = sp.plan_round(server_round, steps=per_round, sample_rate=q)
                if refusal is not None:
                    self.log(f"[{self.site_id}] round {server_round}: {refusal}")
                    raise RoundRefused(self.site_id, server_round, str(refusal))
            try:
                sp.claims.claim(run_id, server_round, digest)
            except RequestConflict as err:
                raise RoundRefused(self.site_id, server_round, f"refused (replay): {err}") from err

            grad = sp.gradient_fn(self.model)
            try:
                trainer = self._trainer(request, grad, per_round, num_rounds, seed=sp.seed % 2**31)
                loader = sp.poisson_loader(
                    self.train_data, self.collator, self.patient_ids, q, loader_options=self.round_loader_options
                )
                torch.manual_seed(sp.seed)
                t_train = time.perf_counter()
                trainer.fit(loader, epochs=local_epochs)
                train_seconds = time.perf_counter() - t_train
            finally:
                grad.close()
            try:  # charged before anything leaves the site; idempotent per (run id, round)
                sp.record_training(server_round, steps=grad.steps, sample_rate=q)
                bank, contributions = accumulate_bank(
                    self.model,
                    self.stats_loader,
                    trainer.device,
                    "patient_id" if policy.privacy_unit == "patient" else "study_id",
                )
                release = sp.release_bank(bank, server_round, observed_contributions=contributions)
            except PrivacyRefused as err:
                raise RoundRefused(self.site_id, server_round, str(err.refusal)) from err
            self._save_trainer(trainer, server_round)
            spent = sp.epsilon()
        finally:
            sp.close()

        stats = {"sum_image": release.sum_image, "sum_text": release.sum_text, "count": release.count}
        append_jsonl(
            self.state_dir / "bank_history.jsonl",
            {"round": server_round, "released_count": release.count.tolist(), "steps": grad.steps},
        )
        # Only public values travel: no timing (train/handler seconds grow with the realised Poisson batch sizes, a
        # function of the data no accountant charges) and no realised counts; the site's own log keeps the timing.
        metrics: dict[str, float] = {
            "train_steps": float(grad.steps),
            "epsilon": spent.epsilon,
            "epsilon_rdp": spent.rdp,
            "delta": policy.delta,
            "noise_multiplier": float(sp.noise_multiplier or math.nan),
            "sample_rate": q,
            "bank_categories_released": float(release.kept.sum()),
        }
        if spent.prv is not None:
            metrics["epsilon_prv"] = spent.prv
        metrics = {k: float(v) for k, v in metrics.items()}  # plain floats: the stored reply loads weights_only
        expected = max(1, round(q * self.num_train * grad.steps))  # public: q, N and steps are in the ledger
        self.log(
            f"[{self.site_id}] round {server_round}: epsilon {spent.epsilon:.3f} (delta {policy.delta:g}); trained in "
            f"{train_seconds:.1f} s, handler {time.perf_counter() - t_start:.1f} s (local log only, not sent)"
        )
        return SiteUpdate(self.site_id, expected, self._weights(), stats, metrics)

    def _noise_for_run(
        self, sp: Any, server_round: int, run_id: str, q: float, total_steps: int, num_rounds: int
    ) -> None:
        """The policy's sigma, or the one calibrated ONCE for this run's whole schedule, kept in the ledger meta."""
        if self.cfg.privacy.noise_multiplier is not None:
            return
        calibration = dict(sp.ledger.meta().get(CALIBRATION_META, {}))
        if run_id in calibration:
            sp.noise_multiplier = float(calibration[run_id]["noise_multiplier"])
            return
        releases = num_rounds if self.cfg.privacy.release_prototypes else 0
        try:
            sigma = sp.calibrate(total_steps, q, releases=releases)
        except ValueError as err:  # the earlier spend leaves no room for this schedule at any sigma
            raise RoundRefused(
                self.site_id, server_round, f"refused (budget): cannot calibrate noise for run {run_id}: {err}"
            ) from err
        calibration[run_id] = {
            "noise_multiplier": sigma,
            "total_steps": total_steps,
            "sample_rate": q,
            "releases": releases,
        }
        sp.ledger.set_meta(CALIBRATION_META, calibration)
        self.log(f"[{self.site_id}] run {run_id}: calibrated sigma={sigma:.4f} for {total_steps} steps at q={q:.4f}")

    # ------------------------------------------------------------------ shared plumbing
    def _trainer(
        self, request: RoundRequest, gradient_fn: GradientFn, per_round: int, num_rounds: int, seed: int | None = None
    ) -> LocalTrainer:
        """The site's trainer resumed from its previous round (optimiser moments, schedule, counters).

        ``seed`` replaces ``train.seed`` (under DP: a secret one, so dropout and ITM negatives are not derivable
        from the experiment config)."""
        update: dict[str, Any] = {"progress_bar": False}
        if seed is not None:
            update["seed"] = seed
        train_cfg = self.cfg.train.model_copy(update=update)
        trainer = LocalTrainer(
            self.model,
            train_cfg,
            total_steps=per_round * num_rounds,
            output_dir=self.state_dir,
            gradient_fn=gradient_fn,
        )
        previous = self.state_dir / TRAINER_CHECKPOINT.format(request.server_round - 1)
        if previous.exists():  # optimiser moments, schedule position and counters of this site's last round
            trainer.load_checkpoint(previous)
            if trainer.state.batches_done_in_epoch:  # a round cut short by max_steps: the next starts a fresh epoch
                trainer.state.epoch += 1
                trainer.state.batches_done_in_epoch = 0
        self._load_global(request)
        if self.cfg.train.max_steps is not None:  # bounds this round, not the site's lifetime
            trainer.cfg = train_cfg.model_copy(update={"max_steps": trainer.state.global_step + per_round})
        return trainer

    def _save_trainer(self, trainer: LocalTrainer, server_round: int) -> None:
        trainer.save_checkpoint(self.state_dir / TRAINER_CHECKPOINT.format(server_round))
        self._prune_checkpoints(keep_from=server_round - 1)

    def _weights(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _load_global(self, request: RoundRequest) -> None:
        self.model.load_state_dict(request.weights)
        bank = self.model.prototype_bank
        bank.load_state_dict({**bank.state_dict(), **request.bank})
        bank.reset_statistics()
        if getattr(self.model, "category_contrast", None) is not None:
            self.model.sync_knowledge_prototypes_from_bank()

    def _prune_checkpoints(self, keep_from: int) -> None:
        for path in self.state_dir.glob("trainer_round_*.pt"):
            if int(path.stem.rsplit("_", 1)[1]) < keep_from:
                path.unlink()
