"""Load pretrained tower weights, say exactly what loaded, and refuse a load that is mostly random.

Why: a checkpoint in the wrong layout used to "load" with ``strict=False`` as a warning about missing
and unexpected keys, and training then ran for hours from random weights. Every load here returns a
``WeightLoadReport`` (loaded / missing / unexpected / dropped-on-purpose keys, logged as one line) and
raises ``PretrainedWeightsError`` -- naming the file and the loaded fraction -- when less than the
configured fraction of the tower's tensors received a value. Towers are built before any data is
read (``mlip_fed.pipeline``), so this fails at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlip_fed.config import ConfigError
from mlip_fed.hf_cache import resolve_weights_location
from mlip_fed.model.config import ImageEncoderConfig
from mlip_fed.model.weight_layouts import WeightFormat, convert, detect_format

log = logging.getLogger(__name__)

#: Weight files looked for, in this order, when a folder (or a hub snapshot) is given for the image tower.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Wrappers a training script may put around a state dict; the first one holding a dict is used.
_WRAPPERS = ("state_dict", "model", "module")
#: Prefixes stripped when *every* key has them (DataParallel, or a whole MLIP model's image tower).
_PREFIXES = ("module.", "image_encoder.")
_SHOW = 5


class PretrainedWeightsError(ConfigError):
    """Pretrained weights that cannot initialise the configured tower; raised before any data is read."""


@dataclass
class WeightLoadReport:
    """What one pretrained load did, key by key; ``summary()`` is the line that is logged."""

    tower: str
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    #: Source keys left out on purpose, with the reason (classifier head, BatchNorm running statistics).
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.missing)

    @property
    def fraction(self) -> float:
        """Share of the tower's tensors that received a value from the checkpoint."""
        return len(self.loaded) / self.total if self.total else 0.0

    def summary(self) -> str:
        parts = [
            f"{self.tower} weights {self.source} ({self.format} layout): loaded {len(self.loaded)}/{self.total} "
            f"tensors ({self.fraction:.1%}), missing {len(self.missing)}{_examples(self.missing)}, "
            f"unexpected {len(self.unexpected)}{_examples(self.unexpected)}"
        ]
        reasons: dict[str, int] = {}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        parts += [f"dropped {n}: {reason}" for reason, n in reasons.items()]
        parts += self.notes
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly counts (for run summaries)."""
        return {
            "tower": self.tower,
            "source": self.source,
            "format": self.format,
            "loaded": len(self.loaded),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "dropped": len(self.dropped),
            "fraction": self.fraction,
            "notes": list(self.notes),
        }


def _examples(keys: Sequence[str]) -> str:
    if not keys:
        return ""
    more = f", ... {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f" [{', '.join(keys[:_SHOW])}{more}]"


def enforce_loaded(
    report: WeightLoadReport, *, field: str, min_field: str, min_loaded: float, strict_field: str | None = None
) -> None:
    """Refuse a load below ``min_loaded`` (or, with ``strict_field`` given, any missing/unexpected key); else log it.

    ``field`` / ``min_field`` / ``strict_field`` are the config keys named in the error, so it says what to change.
    """
    if report.fraction < min_loaded:
        raise PretrainedWeightsError(
            f"{field}={report.source}: only {report.fraction:.1%} of the {report.tower} tower's tensors "
            f"({len(report.loaded)}/{report.total}) loaded, below {min_field}={min_loaded:.0%}; "
            f"the checkpoint does not fit this tower. {report.summary()}{_hints(report)}"
        )
    if strict_field and (report.missing or report.unexpected):
        raise PretrainedWeightsError(
            f"{field}={report.source}: {strict_field}=true needs every tensor, but {report.fraction:.1%} loaded "
            f"with {len(report.missing)} missing and {len(report.unexpected)} unexpected; the checkpoint does not "
            f"fully fit. {report.summary()}{_hints(report)}. Set {strict_field}=false to accept a partial load "
            f"of at least {min_field}"
        )
    level = logging.WARNING if report.missing or report.unexpected else logging.INFO
    log.log(level, "%s", report.summary())


def _hints(report: WeightLoadReport) -> str:
    hints = []
    if any(k.endswith("attn.qkv.bias") for k in report.unexpected):
        hints.append("the checkpoint has qkv biases: set model.image.qkv_bias=true")
    if any(k.endswith("attn.qkv.bias") for k in report.missing):
        hints.append("the checkpoint has no qkv biases: set model.image.qkv_bias=false")
    return "".join(f"; hint: {h}" for h in hints)


# ---------------------------------------------------------------------------- reading a file
def weights_file(value: str, *, field: str) -> Path:
    """A weights file from a file path, a model folder, or a hub id in the local cache."""
    path = resolve_weights_location(value, field=field)
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in path.glob(ext))
    if len(candidates) == 1:
        return candidates[0]
    raise PretrainedWeightsError(
        f"{field}={value}: folder {path} holds {len(candidates)} weight files "
        f"({', '.join(p.name for p in candidates) or 'none'}); name the file"
    )


def read_state_dict(path: Path, *, field: str) -> tuple[dict[str, Tensor], list[str]]:
    """Tensors of a ``.safetensors`` or torch file, unwrapped; and notes on what was unwrapped."""
    notes: list[str] = []
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code, a truncated file, not a checkpoint at all
        raise PretrainedWeightsError(f"{field}: cannot read {path} as weights: {type(err).__name__}: {err}") from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            notes.append(f"read the {key!r} entry of the file")
            break
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{field}: {path} holds a {type(state).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
            notes.append(f"stripped key prefix {prefix!r}")
    return tensors, notes


# ---------------------------------------------------------------------------- the image tower
def load_image_weights(module: nn.Module, cfg: ImageEncoderConfig) -> WeightLoadReport:
    """Load ``cfg.pretrained_path`` into the image tower ``module`` in place; the report says what happened."""
    field = "model.image.pretrained_path"
    assert cfg.pretrained_path is not None
    path = weights_file(cfg.pretrained_path, field=field)
    state, notes = read_state_dict(path, field=field)
    detected, source_family = detect_format(state)
    fmt: WeightFormat = detected if cfg.pretrained_format == "auto" else cfg.pretrained_format
    family = "vit" if cfg.arch.startswith("vit") else "resnet"
    target = {k: v.shape for k, v in module.state_dict().items()}
    try:
        conversion = convert(state, fmt, family, target)
    except ValueError as err:
        raise PretrainedWeightsError(f"{field}={cfg.pretrained_path}: {path}: {err}") from None
    source = str(path) if str(path) == cfg.pretrained_path else f"{cfg.pretrained_path} ({path})"
    _refuse_shape_mismatch(conversion.tensors, target, source=source, cfg=cfg)
    report = WeightLoadReport(
        tower="image",
        source=source,
        format=fmt if cfg.pretrained_format != "auto" else f"{fmt}, auto-detected",
        loaded=[k for k in target if k in conversion.tensors],
        missing=[k for k in target if k not in conversion.tensors],
        unexpected=conversion.unused + [k for k in conversion.tensors if k not in target],
        dropped=conversion.dropped,
        notes=notes + conversion.notes,
    )
    if source_family not in ("unknown", family):
        report.notes.append(f"the file holds a {source_family} but model.image.arch={cfg.arch}")
    enforce_loaded(
        report,
        field=field,
        min_field="model.image.pretrained_min_loaded",
        min_loaded=cfg.pretrained_min_loaded,
        strict_field="model.image.pretrained_strict" if cfg.pretrained_strict else None,
    )
    with torch.no_grad():
        module.load_state_dict({k: conversion.tensors[k] for k in report.loaded}, strict=False)
    return report


def _refuse_shape_mismatch(
    tensors: Mapping[str, Tensor], target: Mapping[str, torch.Size], *, source: str, cfg: ImageEncoderConfig
) -> None:
    bad = [
        f"{k} {tuple(v.shape)} in the file vs {tuple(target[k])} in the tower"
        for k, v in tensors.items()
        if k in target and tuple(v.shape) != tuple(target[k])
    ]
    if not bad:
        return
    hint = ""
    kernel = tensors.get("vit.patch_embedding.patch_embeddings.weight")
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-1] != cfg.patch_size:
        hint = f"; the checkpoint's patches are {kernel.shape[-1]}x{kernel.shape[-1]}: set model.image.patch_size"
    fit = sum(1 for k, v in tensors.items() if k in target and tuple(v.shape) == tuple(target[k]))
    raise PretrainedWeightsError(
        f"model.image.pretrained_path={source} does not fit model.image.arch={cfg.arch} "
        f"(image_size={cfg.image_size}): only {fit / len(target):.1%} of the tower's tensors ({fit}/{len(target)}) "
        f"fit; {len(bad)} tensor shape(s) differ: {'; '.join(bad[:3])}{hint}"
    )


# ---------------------------------------------------------------------------- the text tower
def text_load_report(
    model: nn.Module, info: Mapping[str, Any], *, source: str, model_type: str, notes: Sequence[str] = ()
) -> WeightLoadReport:
    """A report from ``from_pretrained(..., output_loading_info=True)``; shape-mismatched keys count as missing."""
    missing = set(info.get("missing_keys", ())) | {str(m[0]) for m in info.get("mismatched_keys", ())}
    target = list(model.state_dict())
    return WeightLoadReport(
        tower="text",
        source=source,
        format=f"transformers {model_type}",
        loaded=[k for k in target if k not in missing],
        missing=[k for k in target if k in missing],
        unexpected=sorted(info.get("unexpected_keys", ())),
        notes=list(notes),
    )
