"""Shared pieces of the quality benchmarks: the evaluation pool, a fixed-step training run, the reference rows.

Every quality table (ablation, fed vs central, DP utility) shows a method beside the same references,
measured the same way (``mlip_fed.eval.protocol``):

* **raw-pixel LR**: the probe on standardised raw pixels (C = 0.01, the difficulty baseline's recipe);
* **hospital identity** (ablation): the probe on a one-hot site id, the floor a mere hospital detector reaches;
* **random init**: the seeded, untrained encoder;
* **supervised ceiling**: the same image tower trained with the 14 labels (``objectives=supervised``, BCE)
  on the same pretraining studies for the same number of steps;
* **gap closed** = (method − random) / (supervised − random), per label fraction.

The data: SynthCXR at ``--difficulty`` with ``test_fraction`` of each site's patients held out of
pretraining; those held-out studies are the evaluation pool, split once by patient into probe-train (2/3)
and probe-test (1/3). Each run writes its own JSON file; a rerun skips finished runs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlip_fed.eval.protocol import ProbeProtocol, evaluate_probe, evaluation_pool

#: Raw pixels are 4,096 correlated features: the difficulty baseline's stronger regularisation.
RAW_PIXEL_C = 0.01


@dataclass
class Pool:
    """Pretraining studies, and the held-out evaluation pool split by patient."""

    pretrain: list[Any]
    probe_train: list[Any]
    probe_test: list[Any]


def load_pool(cfg: Any, seed: int = 0) -> Pool:
    from mlip_fed import pipeline

    data = pipeline.load_records(cfg.data)
    probe_train, probe_test = evaluation_pool(list(data.test), test_fraction=1 / 3, seed=seed)
    return Pool(pretrain=list(data.train), probe_train=probe_train, probe_test=probe_test)


def evaluate_encoder(model: Any, cfg: Any, pool: Pool, protocol: ProbeProtocol, segmentation: bool) -> dict[str, Any]:
    """Probe summaries on the pool, plus zero-shot, retrieval (and segmentation Dice) on probe-test."""
    from mlip_fed import pipeline
    from mlip_fed.eval.features import extract_features
    from mlip_fed.eval.report import evaluate_features

    device = next(model.parameters()).device
    max_length = cfg.model.text.max_length
    train = extract_features(
        model,
        pipeline.eval_dataset(pool.probe_train, cfg, with_masks=segmentation),
        cfg.eval.batch_size,
        device,
        with_patches=segmentation,
        with_masks=segmentation,
    )
    test = extract_features(
        model,
        pipeline.eval_dataset(pool.probe_test, cfg, with_masks=segmentation),
        cfg.eval.batch_size,
        device,
        tokenizer=model.tokenizer,
        max_length=max_length,
        with_patches=segmentation,
        with_masks=segmentation,
    )
    probe = evaluate_probe(train["pooled"], train["labels"], test["pooled"], test["labels"], protocol)
    uses_text = cfg.model.objectives.uses_text()
    eval_cfg = cfg.eval.model_copy(
        update={
            "max_length": max_length,
            "linear_probe": cfg.eval.linear_probe.model_copy(update={"enabled": False}),
            "zero_shot": cfg.eval.zero_shot.model_copy(update={"enabled": uses_text}),
            "retrieval": cfg.eval.retrieval.model_copy(update={"enabled": uses_text}),
            "segmentation": cfg.eval.segmentation.model_copy(update={"enabled": segmentation}),
        }
    )
    other = evaluate_features(model, model.tokenizer, train, test, eval_cfg).flat_metrics()
    return {"probe": [s.as_dict() for s in probe], "metrics": other}


def raw_pixel_probe(pool: Pool, protocol: ProbeProtocol) -> dict[str, Any]:
    """The probe on standardised raw pixels of the pool (images at their stored size)."""
    from PIL import Image

    def labels_tensor(records: list[Any]) -> torch.Tensor:
        return torch.tensor([list(r.labels) for r in records], dtype=torch.float32)

    def pixels(records: list[Any]) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([np.asarray(Image.open(r.image_path), dtype=np.float32).ravel() / 255.0 for r in records])
        )

    raw = replace(protocol, C=RAW_PIXEL_C)
    probe = evaluate_probe(
        pixels(pool.probe_train),
        labels_tensor(pool.probe_train),
        pixels(pool.probe_test),
        labels_tensor(pool.probe_test),
        raw,
    )
    return {"probe": [s.as_dict() for s in probe], "metrics": {}}


def site_identity_probe(pool: Pool, protocol: ProbeProtocol) -> dict[str, Any]:
    """The probe on the hospital alone (one-hot site id): what an encoder gets for merely telling hospitals apart.

    SynthCXR hospitals differ in prevalence as well as in scanner and report style, and the evaluation pool mixes
    them, so a feature that only identifies the hospital already ranks studies above chance. A pretrained row is
    worth something beyond this row only where it beats it.
    """
    sites = sorted({str(r.site_id) for r in (*pool.probe_train, *pool.probe_test)})

    def one_hot(records: list[Any]) -> torch.Tensor:
        return torch.tensor([[float(str(r.site_id) == s) for s in sites] for r in records])

    def labels_tensor(records: list[Any]) -> torch.Tensor:
        return torch.tensor([list(r.labels) for r in records], dtype=torch.float32)

    probe = evaluate_probe(
        one_hot(pool.probe_train),
        labels_tensor(pool.probe_train),
        one_hot(pool.probe_test),
        labels_tensor(pool.probe_test),
        protocol,
    )
    return {"probe": [s.as_dict() for s in probe], "metrics": {}, "sites": sites}


def run_once(path: Path, make: Any) -> dict[str, Any]:
    """The run's result file, made by ``make()`` only if absent (a rerun skips finished runs)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlip_fed.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def probe_mean(result: dict[str, Any], fraction: float) -> float:
    """A run's probe AUROC (mean over draws) at ``fraction``; NaN when not measured."""
    for s in result.get("probe", []):
        if math.isclose(s["fraction"], fraction):
            return float(s["mean"])
    return math.nan


def probe_noise(result: dict[str, Any], fraction: float) -> float:
    """Half the bootstrap 95 % CI width of a run's probe AUROC at ``fraction``: a gain below it is no effect.

    NaN when the run has no CI (no bootstrap): then nothing is ruled out on this ground.
    """
    for s in result.get("probe", []):
        if math.isclose(s["fraction"], fraction):
            low, high = s.get("ci", [math.nan, math.nan])
            if low is not None and high is not None:
                return 0.5 * (float(high) - float(low))
    return math.nan


def real_gain(result: dict[str, Any], baseline: dict[str, Any], fraction: float) -> float:
    """``result``'s probe gain over ``baseline`` at ``fraction``; NaN when not above the probe's own noise.

    A ratio against a gain inside the noise (kept, gain ratio) is a ratio of noise: the tables say so instead.
    """
    gain = probe_mean(result, fraction) - probe_mean(baseline, fraction)
    noise = probe_noise(result, fraction)
    return gain if gain > 0 and not gain <= noise else math.nan


def seed_stats(values: list[float]) -> tuple[float, float, int]:
    """(mean, std, n) over seeds of the finite values."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return math.nan, math.nan, 0
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else math.nan, len(clean)
