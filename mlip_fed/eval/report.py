"""Run the evaluation suite on a frozen encoder and write its result as JSON and a markdown table.

``evaluate_all`` is the one entry point ``mlip-eval`` and the federated server call. The encoder
runs once per split; every enabled evaluator then works on the cached features, so the server's
per-round evaluation (linear probe + retrieval) costs one pass over each split plus a few
logistic regressions. Result files are written atomically (temp file, fsync, rename), so a crash
never leaves a half-written result behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from mlip_fed.eval.config import EvalConfig
from mlip_fed.eval.features import FeatureSet, ImageTextEncoder, Tokenizer, extract_features
from mlip_fed.eval.linear_probe import LinearProbeResult, binarize_labels, run_linear_probe
from mlip_fed.eval.retrieval import RetrievalResult, retrieval_metrics
from mlip_fed.eval.segmentation import SegmentationResult, run_segmentation
from mlip_fed.eval.zero_shot import ZeroShotResult, run_zero_shot
from mlip_fed.io import atomic_write_text
from mlip_fed.knowledge.kb import load_knowledge_base


class EvalResult(BaseModel):
    """Everything one evaluation produced; a disabled evaluator's entry is None."""

    model_config = ConfigDict(extra="forbid")

    n_train: int
    n_test: int
    seed: int
    linear_probe: LinearProbeResult | None = None
    zero_shot: ZeroShotResult | None = None
    retrieval: RetrievalResult | None = None
    segmentation: SegmentationResult | None = None

    def flat_metrics(self) -> dict[str, float]:
        """Scalar headline metrics with slash-separated keys, for per-round logs and Flower MetricRecords."""
        out: dict[str, float] = {}
        if self.linear_probe is not None:
            for fr in self.linear_probe.fractions:
                out[f"linear_probe/macro_auroc@{fr.fraction:g}"] = fr.macro_auroc
        if self.zero_shot is not None:
            out["zero_shot/macro_auroc"] = self.zero_shot.macro_auroc
            out["zero_shot/accuracy"] = self.zero_shot.accuracy
        if self.retrieval is not None:
            for name, d in (("i2t", self.retrieval.image_to_text), ("t2i", self.retrieval.text_to_image)):
                for k, v in d.recall.items():
                    out[f"retrieval/{name}_R@{k}"] = v
                out[f"retrieval/{name}_median_rank"] = d.median_rank
        if self.segmentation is not None:
            out["segmentation/mean_dice"] = self.segmentation.mean_dice
            out["segmentation/mean_dice_positive"] = self.segmentation.mean_dice_positive
        return out

    def not_computed(self) -> dict[str, str]:
        """Enabled evaluators that produced no metric, with the reason (absent from ``flat_metrics``)."""
        if self.linear_probe is not None and self.linear_probe.not_computed is not None:
            return {"linear_probe": self.linear_probe.not_computed}
        return {}


def _model_device(model: ImageTextEncoder) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return torch.device("cpu")
    first = next(iter(parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def evaluate_features(
    model: ImageTextEncoder,
    tokenizer: Tokenizer | None,
    train: FeatureSet | None,
    test: FeatureSet,
    cfg: EvalConfig,
) -> EvalResult:
    """Run the enabled evaluators on already extracted features (see ``evaluate_all`` for what they need)."""
    device = torch.device(cfg.device) if cfg.device else _model_device(model)
    result = EvalResult(
        n_train=0 if train is None else len(train["reports"]), n_test=len(test["reports"]), seed=cfg.seed
    )
    needs_train = cfg.linear_probe.enabled or cfg.segmentation.enabled
    if needs_train and train is None:
        raise ValueError("linear probe and segmentation need train features; got none")
    if cfg.linear_probe.enabled:
        assert train is not None
        lp = cfg.linear_probe
        result.linear_probe = run_linear_probe(
            train["pooled"],
            train["labels"],
            test["pooled"],
            test["labels"],
            fractions=lp.fractions,
            classes=lp.classes,
            policy=lp.policy,
            seed=cfg.seed,
            C=lp.C,
            c_grid=lp.c_grid,
            min_count=lp.min_count,
            max_iter=lp.max_iter,
        )
    if cfg.zero_shot.enabled:
        if tokenizer is None:
            raise ValueError("zero-shot evaluation needs a tokenizer; got None")
        zs = cfg.zero_shot
        result.zero_shot = run_zero_shot(
            model,
            tokenizer,
            test["embedding"],
            test["labels"],
            device,
            classes=zs.classes,
            kb=load_knowledge_base(zs.kb_path),
            policy=zs.policy,
            max_length=cfg.max_length,
        )
    if cfg.retrieval.enabled:
        if "text_embedding" not in test:
            raise ValueError("retrieval needs test text embeddings: extract test features with a tokenizer")
        rt = cfg.retrieval
        result.retrieval = retrieval_metrics(
            test["embedding"],
            test["text_embedding"],
            ks=rt.ks,
            block_size=rt.block_size,
            labels=binarize_labels(test["labels"], rt.policy),
            precision_ks=rt.precision_ks,
        )
    if cfg.segmentation.enabled:
        assert train is not None
        for name, fs in (("train", train), ("test", test)):
            if "patches" not in fs or "masks" not in fs:
                raise ValueError(f"segmentation needs {name} features extracted with patches and masks")
        sg = cfg.segmentation
        result.segmentation = run_segmentation(
            train["patches"],
            train["masks"],
            test["patches"],
            test["masks"],
            test["grid"],
            sg.class_names,
            epochs=sg.epochs,
            lr=sg.lr,
            batch_size=sg.batch_size,
            hidden=sg.hidden,
            seed=cfg.seed,
            device=device,
        )
    return result


def evaluate_all(
    model: ImageTextEncoder,
    tokenizer: Tokenizer | None,
    train_ds: Dataset | None,
    test_ds: Dataset,
    cfg: EvalConfig | None = None,
    *,
    progress: bool = False,
) -> EvalResult:
    """Extract features once per split, then run every enabled evaluator on them.

    The model must already be on ``cfg.device`` (or ``cfg.device`` left None); it is evaluated in
    eval mode and handed back in the mode it came in. ``train_ds`` may be None when only zero-shot
    and retrieval (test-only evaluators) are enabled. A tokenizer is needed for zero-shot and retrieval.
    """
    cfg = cfg or EvalConfig()
    device = torch.device(cfg.device) if cfg.device else _model_device(model)
    seg = cfg.segmentation.enabled
    if cfg.retrieval.enabled and tokenizer is None:
        raise ValueError("retrieval needs a tokenizer to encode the test reports; got None")
    train = None
    if cfg.linear_probe.enabled or seg:
        if train_ds is None:
            raise ValueError("linear probe and segmentation need a train dataset; got None")
        train = extract_features(
            model, train_ds, cfg.batch_size, device, with_patches=seg, with_masks=seg, progress=progress
        )
    test = extract_features(
        model,
        test_ds,
        cfg.batch_size,
        device,
        tokenizer=tokenizer if cfg.retrieval.enabled else None,
        max_length=cfg.max_length,
        with_patches=seg,
        with_masks=seg,
        progress=progress,
    )
    return evaluate_features(model, tokenizer, train, test, cfg)


def write_json(result: EvalResult, path: str | Path) -> Path:
    """Standard JSON (undefined metrics as ``null``), written atomically."""
    return atomic_write_text(path, result.model_dump_json(indent=2) + "\n")


def load_result(path: str | Path) -> EvalResult:
    """Read a result file written by ``write_json``; ``null`` metrics come back as NaN."""
    try:
        return EvalResult.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not a valid evaluation result: {err}") from err


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def to_markdown(result: EvalResult, title: str = "Evaluation") -> str:
    """Markdown tables, one section per evaluator that ran; ``n/a`` marks an undefined metric."""
    lines = [f"# {title}", "", f"train n = {result.n_train}, test n = {result.n_test}, seed = {result.seed}", ""]
    if result.linear_probe is not None:
        lines += _linear_probe_markdown(result.linear_probe)
    zs = result.zero_shot
    if zs is not None:
        rows = [[c, _fmt(zs.per_class[c])] for c in zs.classes]
        rows.append(["**macro**", f"**{_fmt(zs.macro_auroc)}**"])
        lines += [f"## Zero-shot (policy {zs.policy})", "", *_table(["class", "AUROC"], rows), ""]
        lines += [f"Argmax accuracy on {zs.n_accuracy} single-positive images: {_fmt(zs.accuracy)}", ""]
    rt = result.retrieval
    if rt is not None:
        ks = list(rt.image_to_text.recall)
        pks = list(rt.image_to_text.precision)
        header = ["direction", *(f"R@{k}" for k in ks), "median rank", *(f"label P@{k}" for k in pks)]
        rows = [
            [name, *(_fmt(d.recall[k]) for k in ks), f"{d.median_rank:g}", *(_fmt(d.precision[k]) for k in pks)]
            for name, d in (("image→text", rt.image_to_text), ("text→image", rt.text_to_image))
        ]
        lines += [f"## Retrieval (n = {rt.n} pairs)", "", *_table(header, rows), ""]
    sg = result.segmentation
    if sg is not None:
        rows = [[c, _fmt(sg.dice[c]), _fmt(sg.dice_positive[c])] for c in sg.class_names]
        rows.append(["**mean**", f"**{_fmt(sg.mean_dice)}**", f"**{_fmt(sg.mean_dice_positive)}**"])
        lines += [
            f"## Segmentation (frozen patches, {sg.epochs} epochs)",
            "",
            *_table(["class", "Dice", "Dice (positives only)"], rows),
            "",
        ]
    return "\n".join(lines)


def _linear_probe_markdown(lp: LinearProbeResult) -> list[str]:
    """The probe's table; classes left out for too few positives are rows marked ``skipped``, not silently absent."""
    lines = [f"## Linear probe (policy {lp.policy})", ""]
    if lp.not_computed is not None:
        lines += [f"Not computed: {lp.not_computed}.", ""]
        header = ["class", "status"]
        return [*lines, *_table(header, [[c, f"skipped: {why}"] for c, why in lp.excluded.items()]), ""]
    header = ["class", *(f"AUROC @ {fr.fraction:g} (n={fr.n_train})" for fr in lp.fractions)]
    rows = [[c, *(_fmt(fr.per_class[c]) for fr in lp.fractions)] for c in lp.classes]
    rows += [[c, *("skipped" for _ in lp.fractions)] for c in lp.excluded]
    rows.append(["**macro**", *(f"**{_fmt(fr.macro_auroc)}**" for fr in lp.fractions)])
    lines += [*_table(header, rows), ""]
    notes = sorted({f"{c} @ {fr.fraction:g}: {why}" for fr in lp.fractions for c, why in fr.skipped.items()})
    notes = [f"- excluded {n}" for n in notes] + [f"- skipped {c}: {why}" for c, why in lp.excluded.items()]
    return [*lines, *notes, *([""] if notes else [])]


def write_markdown(result: EvalResult, path: str | Path, title: str = "Evaluation") -> Path:
    """The markdown tables of ``to_markdown``, written atomically."""
    return atomic_write_text(path, to_markdown(result, title))
