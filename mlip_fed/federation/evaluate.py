"""Server-side evaluation each round on a held-out split: linear-probe AUROC and retrieval R@5.

The held-out set is the pooled test split of the federation's data (in simulation the server may
read it; in deployment it would be the server's own labelled set named by the data config). The
encoder runs once per round over it; a seeded patient-level half split trains the probe and the other
half scores it, so no patient is on both sides. Only the 100 % label fraction with a fixed C: this is
a per-round signal, not the paper's table (that is ``mlip-eval``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mlip_fed.config import ExperimentConfig
from mlip_fed.data.records import StudyRecord


def patient_halves(records: Sequence[StudyRecord], seed: int) -> tuple[list[int], list[int]]:
    """Row indices of a seeded patient-level 50/50 split (probe-train, probe-test)."""
    patients = sorted({r.patient_id for r in records})
    random.Random(seed).shuffle(patients)
    train_patients = set(patients[: len(patients) // 2])
    first = [i for i, r in enumerate(records) if r.patient_id in train_patients]
    second = [i for i, r in enumerate(records) if r.patient_id not in train_patients]
    if not first or not second:
        raise ValueError(f"held-out split has {len(patients)} patient(s); need at least 2 for a probe split")
    return first, second


class ServerEvaluator:
    """Callable ``(weights, bank) -> {"auroc", "r_at_5", ...}`` on a fixed held-out set."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: Any,
        records: Sequence[StudyRecord],
        *,
        min_class_count: int = 3,
        log: Callable[[str], None] = print,
    ) -> None:
        from mlip_fed.pipeline import eval_dataset

        if len(records) < 4:
            raise ValueError(f"server evaluation needs at least 4 held-out studies, got {len(records)}")
        self.cfg = cfg
        self.model = model
        self.records = list(records)
        self.dataset = eval_dataset(self.records, cfg)
        self.probe_train, self.probe_test = patient_halves(self.records, cfg.eval.seed)
        self.min_class_count = min_class_count
        self.log = log

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, model: Any, log: Callable[[str], None] = print) -> ServerEvaluator:
        from mlip_fed.pipeline import load_records

        data = load_records(cfg.data, None)
        if not data.test:
            raise ValueError(f"data ({cfg.data.source}, {cfg.data.root}) has no test split for server evaluation")
        log(f"[server] evaluation on {len(data.test)} held-out studies")
        return cls(cfg, model, data.test, log=log)

    @torch.no_grad()
    def __call__(self, weights: Mapping[str, Tensor], bank: Mapping[str, Tensor]) -> dict[str, float]:
        from mlip_fed.eval.features import extract_features
        from mlip_fed.eval.linear_probe import binarize_labels, default_classes, run_linear_probe
        from mlip_fed.eval.retrieval import retrieval_metrics

        self.model.load_state_dict(dict(weights))
        device = next(self.model.parameters()).device
        features = extract_features(
            self.model,
            self.dataset,
            self.cfg.eval.batch_size,
            device,
            tokenizer=self.model.tokenizer,
            max_length=self.cfg.model.text.max_length,
        )
        metrics: dict[str, float] = {"n_heldout": float(len(self.records))}
        tr, te = torch.tensor(self.probe_train), torch.tensor(self.probe_test)
        labels = features["labels"]
        classes = default_classes(binarize_labels(labels[tr]), self.min_class_count)
        if classes:
            probe = run_linear_probe(
                features["pooled"][tr],
                labels[tr],
                features["pooled"][te],
                labels[te],
                fractions=(1.0,),
                classes=classes,
                seed=self.cfg.eval.seed,
            )
            metrics["auroc"] = probe.fractions[0].macro_auroc
            metrics["auroc_classes"] = float(sum(not math.isnan(v) for v in probe.fractions[0].per_class.values()))
        else:
            self.log(f"[server] linear probe skipped: no class has {self.min_class_count} positives and negatives")
            metrics["auroc"] = math.nan
        retrieval = retrieval_metrics(features["embedding"], features["text_embedding"], ks=(1, 5, 10))
        metrics["r_at_5_i2t"] = retrieval.image_to_text.recall[5]
        metrics["r_at_5_t2i"] = retrieval.text_to_image.recall[5]
        metrics["r_at_5"] = 0.5 * (metrics["r_at_5_i2t"] + metrics["r_at_5_t2i"])
        return metrics
