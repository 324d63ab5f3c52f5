"""What the evaluation suite runs and how: the ``eval`` block of ``mlip_fed.config.ExperimentConfig``.

Apart from the evaluators so that reading a config loads pydantic only, never sklearn or the segmentation decoder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: How an uncertain (-1) label counts when an evaluator needs a binary one (``eval.linear_probe.binarize_labels``).
UncertaintyPolicy = Literal["u_ones", "u_zeros", "mgca"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearProbeConfig(_Strict):
    enabled: bool = True
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    #: None = every class with ≥ ``min_count`` positives and negatives in the train split.
    classes: tuple[str, ...] | None = None
    policy: UncertaintyPolicy = "u_ones"
    C: float = Field(default=1.0, gt=0)
    #: When set, C is chosen per fraction on a train hold-out (reference: 0.01, 0.1, 1, 10).
    c_grid: tuple[float, ...] | None = None
    min_count: int = Field(default=5, ge=1)
    max_iter: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _fractions_valid(self) -> LinearProbeConfig:
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad or not self.fractions:
            raise ValueError(f"linear_probe.fractions must be non-empty values in (0, 1], got {self.fractions}")
        return self


class ZeroShotConfig(_Strict):
    enabled: bool = True
    #: None = every class with positive and negative prompts in the knowledge base.
    classes: tuple[str, ...] | None = None
    policy: UncertaintyPolicy = "u_ones"
    #: None = the packaged knowledge base (what every site uses).
    kb_path: str | None = None


class RetrievalConfig(_Strict):
    enabled: bool = True
    ks: tuple[int, ...] = (1, 5, 10)
    precision_ks: tuple[int, ...] = (5, 10, 50)
    block_size: int = Field(default=1024, ge=1)
    #: Uncertainty policy for the labels behind label-level precision@K.
    policy: UncertaintyPolicy = "u_ones"


class SegmentationConfig(_Strict):
    #: Off by default: it needs masks in the dataset items and their class names.
    enabled: bool = False
    #: Mask value k (≥ 1) is ``class_names[k - 1]``; 0 is background.
    class_names: tuple[str, ...] = ()
    epochs: int = Field(default=5, ge=1)
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=16, ge=1)
    hidden: int = Field(default=64, ge=8)

    @model_validator(mode="after")
    def _names_when_enabled(self) -> SegmentationConfig:
        if self.enabled and not self.class_names:
            raise ValueError("segmentation.class_names must be given when segmentation.enabled is true")
        return self


class EvalConfig(_Strict):
    """Which evaluators run and how; embedded by the project-wide config."""

    batch_size: int = Field(default=64, ge=1)
    #: None = the device of the model's first parameter (CPU for a parameterless model).
    device: str | None = None
    max_length: int = Field(default=128, ge=8)
    seed: int = 42
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    zero_shot: ZeroShotConfig = ZeroShotConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
