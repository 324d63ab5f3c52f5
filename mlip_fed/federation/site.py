"""One hospital's side of a round: load the global model and bank, train locally, release weights and bank stats.

Used by the ClientApp in simulation (partition id -> SynthCXR hospital) and, next, by the deployed
``mlip-client``. The trainer is the same ``LocalTrainer`` that ``mlip-pretrain`` uses. State that
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

from mlip_fed.config import ExperimentConfig
from mlip_fed.federation.aggregate import BANK_STAT_KEYS
from mlip_fed.federation.payload import RoundRequest, SiteUpdate
from mlip_fed.io import append_jsonl
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.train.trainer import GradientFn, LocalTrainer, standard_gradient

TRAINER_CHECKPOINT = "trainer_round_{:04d}.pt"


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

    def gradient(model: nn.Module, batch: dict[str, Any], loss_scale: float) -> dict[str, float]:
        parts = standard_gradient(model, batch, loss_scale)
        proximal = 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not param.requires_grad or param.grad is None:
                    continue
                anchor = anchors.get(name)
                if anchor is None or anchor.device != param.device:
                    anchor = anchors[name] = global_weights[name].to(param.device, param.dtype)
                diff = param - anchor
                param.grad.add_(diff, alpha=mu * loss_scale)
                proximal += float(diff.pow(2).sum())
            if max_grad_norm is not None:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        parts["proximal"] = 0.5 * mu * proximal
        return parts

    return gradient


# ---------------------------------------------------------------------------- bank statistics
@torch.no_grad()
def bank_statistics(model: Any, loader: DataLoader, device: torch.device) -> dict[str, Tensor]:
    """Per-category sums of unit-norm image/text embeddings and member counts over the site's train split.

    One eval-mode pass after local training, so every member is embedded by the same weights that
    are sent back (during training the weights move under the running sums).
    """
    bank = PrototypeBank(dim=model.prototype_bank.dim, categories=model.prototype_bank.categories)
    was_training = model.training
    model.train(False)
    try:
        for batch in loader:
            if batch is None:
                continue
            image = model.encode_image(batch["image"].to(device)).embedding
            text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).embedding
            bank.accumulate(image, text, batch["labels"])
    finally:
        model.train(was_training)
    state = bank.state_dict()
    return {k: state[k] for k in BANK_STAT_KEYS}


# ---------------------------------------------------------------------------- the site
class SiteRuntime:
    """A hospital's data, model and on-disk state; ``train_round`` answers one server request."""

    def __init__(
        self, cfg: ExperimentConfig, site_index: int, state_dir: Path, log: Callable[[str], None] = print
    ) -> None:
        from mlip_fed.pipeline import (
            build_collator,
            build_model,
            eval_dataset,
            load_records,
            train_dataset,
            train_loader,
        )

        if cfg.privacy.mechanism != "none":
            # Invariant 4: a release not covered by the accountant is not sent. The DP site runtime
            # (noised bank sums, ledger) is not wired into federation yet.
            raise ValueError(
                f"privacy.mechanism={cfg.privacy.mechanism!r}: DP federated training is not supported by this "
                "site runtime yet; refusing to release un-noised weights and prototype statistics"
            )
        self.cfg = cfg
        self.site_index = site_index
        self.site_id = f"site_{site_index}"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        data = load_records(cfg.data, site_index)
        if data.skips.total_skipped:
            log(f"[{self.site_id}] skipped records:\n{data.skips.summary()}")
        self.num_train = len(data.train)
        self.model = build_model(cfg)
        collator = build_collator(self.model, cfg)
        self.loader = train_loader(train_dataset(data.train, cfg), collator, cfg)
        self.stats_loader = DataLoader(
            eval_dataset(data.train, cfg),
            batch_size=cfg.train.batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=collator,
        )

    def steps_per_round(self, local_epochs: int) -> int:
        from mlip_fed.pipeline import steps_per_epoch

        per_round = steps_per_epoch(self.num_train, self.cfg) * local_epochs
        if self.cfg.train.max_steps is not None:  # in federation, max_steps bounds one round
            per_round = min(per_round, self.cfg.train.max_steps)
        return per_round

    def train_round(self, request: RoundRequest) -> SiteUpdate:
        t_start = time.perf_counter()
        server_round = request.server_round
        local_epochs = int(request.config.get("local-epochs", self.cfg.federation.local_epochs))
        num_rounds = int(request.config.get("num-rounds", self.cfg.federation.num_rounds))
        mu = float(request.config.get("proximal-mu", 0.0))
        per_round = self.steps_per_round(local_epochs)

        gradient_fn = (
            proximal_gradient(request.weights, mu, self.cfg.train.max_grad_norm) if mu > 0 else standard_gradient
        )
        train_cfg = self.cfg.train.model_copy(update={"progress_bar": False})
        trainer = LocalTrainer(
            self.model,
            train_cfg,
            total_steps=per_round * num_rounds,
            output_dir=self.state_dir,
            gradient_fn=gradient_fn,
        )
        previous = self.state_dir / TRAINER_CHECKPOINT.format(server_round - 1)
        if previous.exists():  # optimiser moments, schedule position and counters of this site's last round
            trainer.load_checkpoint(previous)
            if trainer.state.batches_done_in_epoch:  # a round cut short by max_steps: the next starts a fresh epoch
                trainer.state.epoch += 1
                trainer.state.batches_done_in_epoch = 0
        self._load_global(request)
        if self.cfg.train.max_steps is not None:  # bounds this round, not the site's lifetime
            trainer.cfg = train_cfg.model_copy(update={"max_steps": trainer.state.global_step + per_round})

        t_train = time.perf_counter()
        summary = trainer.fit(self.loader, epochs=local_epochs)
        train_seconds = time.perf_counter() - t_train
        trainer.save_checkpoint(self.state_dir / TRAINER_CHECKPOINT.format(server_round))
        self._prune_checkpoints(keep_from=server_round - 1)

        stats = bank_statistics(self.model, self.stats_loader, trainer.device)
        weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        append_jsonl(
            self.state_dir / "bank_history.jsonl",
            {"round": server_round, "count": stats["count"].tolist(), "steps": summary.steps},
        )
        metrics = {
            "train_loss": summary.mean_parts.get("total", math.nan),
            "train_steps": float(summary.steps),
            "train_samples": float(summary.samples),
            "train_seconds": train_seconds,
            "handler_seconds": time.perf_counter() - t_start,
        }
        metrics.update({f"loss_{k}": v for k, v in summary.mean_parts.items() if k not in ("total", "grad_norm")})
        return SiteUpdate(self.site_id, self.num_train, weights, stats, metrics)

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
