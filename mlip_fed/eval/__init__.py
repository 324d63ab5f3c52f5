"""Evaluation of a frozen encoder: linear probe, zero-shot, retrieval, segmentation.

Every evaluator works on features cached by one pass of the encoder (``extract_features``), and
depends only on the ``encode_image`` / ``encode_text`` protocol, never on how the model was trained.
"""

from mlip_fed.eval.features import FeatureSet, ImageTextEncoder, Tokenizer, encode_texts, extract_features
from mlip_fed.eval.linear_probe import (
    LinearProbeResult,
    binarize_labels,
    binary_auroc,
    label_fraction_subset,
    run_linear_probe,
)
from mlip_fed.eval.report import (
    EvalConfig,
    EvalResult,
    evaluate_all,
    evaluate_features,
    load_result,
    to_markdown,
    write_json,
    write_markdown,
)
from mlip_fed.eval.retrieval import RetrievalResult, retrieval_metrics
from mlip_fed.eval.segmentation import SegmentationDecoder, SegmentationResult, dice_scores, run_segmentation
from mlip_fed.eval.zero_shot import ZeroShotResult, class_prompt_embeddings, run_zero_shot, zero_shot_scores

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
