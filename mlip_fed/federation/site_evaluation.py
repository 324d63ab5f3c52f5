"""Evaluation where the data is: a site scores the global model on its own split; the server aggregates.

In a deployment the labelled test data sits at the hospitals and the server holds none, so the per-round AUROC can
only come from the sites. On request (``federation.site_evaluation``) each site embeds its own test split and a
seeded subset of its train split with the frozen global encoder, fits the linear probe on the train features at every
label fraction it has enough labels for, scores it on the test split, and runs retrieval and zero-shot on the test
split alone: the same evaluators as ``mlip-eval`` (``eval/report.evaluate_all``). It returns the metrics with their
counts; the server takes, per metric, the mean over the sites that report it, weighted by their test studies, and
keeps every site's own figures beside it.

What the aggregate means: the probe AUROC of a site is a probe trained and tested on that site's data, so the mean is
"how well a hospital's own probe does", not a probe on the pooled data; retrieval R@k ranks among one site's test
reports, so a site with more test studies has a harder retrieval task. Both are reported per site as well.

The metrics are computed on private data and no accountant charges them: a site releases them only where its policy
allows (``PrivacyPolicy.evaluation_released``: by default yes without DP, no under DP); see docs/privacy.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlip_fed.config import ExperimentConfig
from mlip_fed.data.records import StudyRecord
from mlip_fed.federation.payload import RoundRequest, SiteEvaluation, SiteFailure

#: Count metrics a site reports beside its figures; the server sums them instead of averaging.
COUNT_KEYS = ("n_test", "n_probe_train")

#: The coordinator's evaluation request (global weights and bank) -> the sites' evaluations and the sites that did not
#: evaluate (error, refusal, timeout). The ServerApp sends it as Flower ``evaluate`` messages; the in-process
#: simulation calls each ``SiteRuntime.evaluate_round``.
SiteEvaluatorFn = Callable[[RoundRequest], tuple[list[SiteEvaluation], list[SiteFailure]]]


def probe_fractions(fractions: Sequence[float], n_train: int, min_count: int) -> tuple[float, ...]:
    """The label fractions a site has labels for: a subset of at least ``2 * min_count`` studies.

    The probe needs ``min_count`` positives and negatives of a class to fit it; a smaller subset cannot hold them, and
    a probe fitted on a handful of studies reports noise as if it were a result.
    """
    return tuple(f for f in fractions if math.ceil(f * n_train) >= 2 * min_count)


def probe_train_subset(records: Sequence[StudyRecord], limit: int, seed: int) -> list[StudyRecord]:
    """At most ``limit`` train studies, a seeded sample in their original order (the same at every evaluation)."""
    if len(records) <= limit:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


class SiteEvaluator:
    """The evaluators of ``mlip-eval`` on one site's data, built once; calling it scores the model as loaded now."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: Any,
        train_records: Sequence[StudyRecord],
        test_records: Sequence[StudyRecord],
        site_id: str,
    ) -> None:
        from mlip_fed.pipeline import eval_dataset

        if not test_records:
            raise ValueError(
                f"site {site_id} has no test split to evaluate on: its data has no record outside split 'train' "
                "(give it a test split, or set federation.site_evaluation=false)"
            )
        self.model = model
        self.site_id = site_id
        probe_train = probe_train_subset(train_records, cfg.federation.site_evaluation_max_train, cfg.eval.seed)
        lp = cfg.eval.linear_probe
        fractions = probe_fractions(lp.fractions, len(probe_train), lp.min_count)
        self.eval_cfg = cfg.eval.model_copy(
            update={
                "segmentation": cfg.eval.segmentation.model_copy(update={"enabled": False}),  # needs masks: mlip-eval
                "linear_probe": lp.model_copy(
                    update={"enabled": lp.enabled and bool(fractions), "fractions": fractions or lp.fractions}
                ),
            }
        )
        self.n_probe_train = len(probe_train) if self.eval_cfg.linear_probe.enabled else 0
        self.n_test = len(test_records)
        self.train_dataset = eval_dataset(probe_train, cfg) if self.n_probe_train else None
        self.test_dataset = eval_dataset(test_records, cfg)

    def __call__(self) -> dict[str, float]:
        """Flat metrics (``EvalResult.flat_metrics``), ``auroc`` and ``r_at_5`` for the round table, and the counts."""
        from mlip_fed.eval.report import evaluate_all

        result = evaluate_all(
            self.model, self.model.tokenizer, self.train_dataset, self.test_dataset, self.eval_cfg, progress=True
        )
        metrics = result.flat_metrics()
        probe = result.linear_probe
        if probe is not None and probe.fractions:
            largest = max(probe.fractions, key=lambda f: f.fraction)
            metrics["auroc"] = largest.macro_auroc
            metrics["auroc_fraction"] = largest.fraction
        if result.retrieval is not None:
            i2t, t2i = result.retrieval.image_to_text.recall, result.retrieval.text_to_image.recall
            if 5 in i2t and 5 in t2i:
                metrics["r_at_5"] = 0.5 * (i2t[5] + t2i[5])
        metrics["n_test"] = float(result.n_test)
        metrics["n_probe_train"] = float(result.n_train)
        return {k: float(v) for k, v in metrics.items()}


def aggregate_site_evaluations(
    evaluations: Sequence[SiteEvaluation], failures: Sequence[SiteFailure] = ()
) -> dict[str, Any]:
    """Per metric, the mean over the sites reporting a finite value, weighted by their test studies; counts summed.

    A metric a site could not compute (NaN: e.g. no class with both labels in its test split) leaves that site out of
    that metric's mean rather than dragging it; ``sites`` keeps every site's own figures and ``failures`` names the
    sites that did not answer or refused.
    """
    ordered = sorted(evaluations, key=lambda e: e.site_id)
    keys = sorted({k for e in ordered for k in e.metrics if k not in COUNT_KEYS})
    metrics: dict[str, float] = {}
    for key in keys:
        pairs = [
            (float(e.metrics[key]), float(e.num_examples))
            for e in ordered
            if key in e.metrics and math.isfinite(float(e.metrics[key])) and e.num_examples > 0
        ]
        total = sum(w for _, w in pairs)
        metrics[key] = sum(v * w for v, w in pairs) / total if total > 0 else math.nan
    for key in COUNT_KEYS:
        metrics[key] = float(sum(float(e.metrics.get(key, 0.0)) for e in ordered))
    return {
        "metrics": metrics,
        "num_sites": len(ordered),
        "num_examples": int(sum(e.num_examples for e in ordered)),
        "sites": [{"site_id": e.site_id, "num_examples": e.num_examples, **e.metrics} for e in ordered],
        "failures": [f.as_dict() for f in failures],
    }


def evaluation_line(server_round: int, aggregate: Mapping[str, Any]) -> str:
    """One console line: the aggregate, each site's AUROC and test count, and who did not evaluate."""

    def fmt(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"

    metrics = aggregate.get("metrics", {})
    sites = ", ".join(
        f"{s['site_id']} {fmt(s.get('auroc'))} (n={s['num_examples']})" for s in aggregate.get("sites", [])
    )
    line = (
        f"[server] round {server_round} evaluated at {aggregate.get('num_sites', 0)} site(s) on "
        f"{aggregate.get('num_examples', 0)} test studies: AUROC {fmt(metrics.get('auroc'))}, "
        f"R@5 {fmt(metrics.get('r_at_5'))}" + (f" [{sites}]" if sites else "")
    )
    failed = aggregate.get("failures", [])
    if failed:
        line += "; not evaluated: " + ", ".join(f"{f['site_id']} ({f['reason']})" for f in failed)
    return line
