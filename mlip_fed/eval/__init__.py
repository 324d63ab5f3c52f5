"""Evaluation of a frozen encoder: linear probe, zero-shot, retrieval, segmentation.

Every evaluator works on features cached by one pass of the encoder (``extract_features``), and
depends only on the ``encode_image`` / ``encode_text`` protocol, never on how the model was trained.

The names load on first use: ``mlip_fed.config`` imports ``mlip_fed.eval.config`` (for ``EvalConfig``), and an
eager package would load sklearn (linear probe) and the segmentation decoder into every ClientApp process.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FeatureSet": "mlip_fed.eval.features",
    "ImageTextEncoder": "mlip_fed.eval.features",
    "Tokenizer": "mlip_fed.eval.features",
    "encode_texts": "mlip_fed.eval.features",
    "extract_features": "mlip_fed.eval.features",
    "LinearProbeResult": "mlip_fed.eval.linear_probe",
    "binarize_labels": "mlip_fed.eval.linear_probe",
    "binary_auroc": "mlip_fed.eval.linear_probe",
    "label_fraction_subset": "mlip_fed.eval.linear_probe",
    "run_linear_probe": "mlip_fed.eval.linear_probe",
    "EvalConfig": "mlip_fed.eval.config",
    "EvalResult": "mlip_fed.eval.report",
    "evaluate_all": "mlip_fed.eval.report",
    "evaluate_features": "mlip_fed.eval.report",
    "load_result": "mlip_fed.eval.report",
    "to_markdown": "mlip_fed.eval.report",
    "write_json": "mlip_fed.eval.report",
    "write_markdown": "mlip_fed.eval.report",
    "RetrievalResult": "mlip_fed.eval.retrieval",
    "retrieval_metrics": "mlip_fed.eval.retrieval",
    "SegmentationDecoder": "mlip_fed.eval.segmentation",
    "SegmentationResult": "mlip_fed.eval.segmentation",
    "dice_scores": "mlip_fed.eval.segmentation",
    "run_segmentation": "mlip_fed.eval.segmentation",
    "ZeroShotResult": "mlip_fed.eval.zero_shot",
    "class_prompt_embeddings": "mlip_fed.eval.zero_shot",
    "run_zero_shot": "mlip_fed.eval.zero_shot",
    "zero_shot_scores": "mlip_fed.eval.zero_shot",
}

__all__ = [
    "EvalConfig",
    "EvalResult",
    "FeatureSet",
    "ImageTextEncoder",
    "LinearProbeResult",
    "RetrievalResult",
    "SegmentationDecoder",
    "SegmentationResult",
    "Tokenizer",
    "ZeroShotResult",
    "binarize_labels",
    "binary_auroc",
    "class_prompt_embeddings",
    "dice_scores",
    "encode_texts",
    "evaluate_all",
    "evaluate_features",
    "extract_features",
    "label_fraction_subset",
    "load_result",
    "retrieval_metrics",
    "run_linear_probe",
    "run_segmentation",
    "run_zero_shot",
    "to_markdown",
    "write_json",
    "write_markdown",
    "zero_shot_scores",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
