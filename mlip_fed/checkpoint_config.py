"""The config a checkpoint was trained with, with the user's overrides layered on top.

Why: a checkpoint only loads into the model it was trained with. ``mlip-pretrain`` saves the validated
config as ``config.json`` beside ``checkpoint.pt`` (a federation checkpoint carries it inside, under
``config``), so ``mlip-eval --checkpoint`` starts from that instead of from the YAML defaults and the user
does not have to repeat the training overrides. Overrides still apply, on top:

* ``a.b=v`` sets that one field (the value as hydra parses it);
* a group selection replaces what the group configures: ``data=mimic`` the ``data`` section,
  ``objectives=clip_only`` the objectives, ``model=vit_tiny`` the model (keeping the saved objectives);
* ``experiment=NAME`` is ignored: the saved config already is an experiment, and re-applying a preset
  would silently drop what the training run overrode (its data root, say). A warning says so when
  ``NAME`` is not the experiment the checkpoint was trained as;
* ``data.image_size`` follows the model's image size unless set explicitly: the encoder sees the size
  it was trained on.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlip_fed.config import ConfigError, ExperimentConfig, validate_experiment

log = logging.getLogger(__name__)

#: Written by ``mlip-pretrain`` beside ``checkpoint.pt``: the validated config of the run.
SAVED_CONFIG_NAME = "config.json"

#: Hydra groups whose selection replaces one top-level section of the saved config.
_SECTION_GROUPS = ("data", "train", "eval", "privacy", "federation")


def saved_config(checkpoint: Path) -> tuple[dict[str, Any], str] | None:
    """The config ``checkpoint`` was trained with and where it was found; None when nothing was saved."""
    beside = Path(checkpoint).parent / SAVED_CONFIG_NAME
    if beside.is_file():
        try:
            return json.loads(beside.read_text(encoding="utf-8")), str(beside)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{beside}: cannot read the saved training config: {err}") from None
    embedded = _embedded_config(Path(checkpoint))
    return (embedded, f"{checkpoint} (embedded config)") if embedded else None


def _embedded_config(checkpoint: Path) -> dict[str, Any] | None:
    """A federation checkpoint's own ``config``; memory-mapped so the weights are not read twice."""
    if not checkpoint.is_file():
        return None
    import torch

    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # unreadable or not a zip checkpoint: loading the weights will say why
        return None
    config = data.get("config") if isinstance(data, dict) else None
    return dict(config) if isinstance(config, dict) and config else None


def layer_overrides(saved: dict[str, Any], overrides: Sequence[str], origin: str) -> ExperimentConfig:
    """Validate ``saved`` with ``overrides`` applied on top (rules in the module docstring)."""
    from mlip_fed.config_compose import compose_raw

    merged = copy.deepcopy(saved)
    if overrides:
        composed = compose_raw(list(overrides))
        for override in overrides:
            _apply(merged, composed, override)
    if not any(_key_path(o) == ["data", "image_size"] for o in overrides):
        _follow_model_image_size(merged)
    shown = f" + [{' '.join(overrides)}]" if overrides else ""
    return validate_experiment(merged, origin=f"{origin}{shown}")


def _key_path(override: str) -> list[str]:
    """``++objectives.itm.enabled=false`` → ``['model', 'objectives', 'itm', 'enabled']`` (schema path)."""
    key = override.split("=", 1)[0].lstrip("+~")
    path = key.split(".")
    return ["model", *path] if path[0] == "objectives" and len(path) > 1 else path


def _apply(merged: dict[str, Any], composed: dict[str, Any], override: str) -> None:
    """Apply one override to ``merged``, taking its value from hydra's composition of all overrides."""
    if "=" not in override:
        return
    path = _key_path(override)
    if len(path) > 1:
        _set_field(merged, composed, path, delete=override.startswith("~"))
        return
    group = path[0]
    if group == "experiment":
        if composed.get("name") != merged.get("name"):
            log.warning(
                "%s ignored: the checkpoint's saved config is experiment %r; override single fields with key=value",
                override,
                merged.get("name"),
            )
    elif group == "model":
        objectives = merged.get("model", {}).get("objectives")
        merged["model"] = copy.deepcopy(composed["model"])
        if objectives is not None:
            merged["model"]["objectives"] = objectives
    elif group == "objectives":
        merged.setdefault("model", {})["objectives"] = copy.deepcopy(composed["model"]["objectives"])
    elif group in _SECTION_GROUPS or group in composed:
        merged[group] = copy.deepcopy(composed[group])


def _set_field(merged: dict[str, Any], composed: dict[str, Any], path: list[str], *, delete: bool) -> None:
    node = merged
    for part in path[:-1]:
        if delete and not isinstance(node.get(part), dict):
            return
        node = node.setdefault(part, {})
    if delete:
        node.pop(path[-1], None)
        return
    value: Any = composed
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return  # hydra dropped it (e.g. a deletion); nothing to layer
        value = value[part]
    node[path[-1]] = copy.deepcopy(value)


def _follow_model_image_size(merged: dict[str, Any]) -> None:
    size = merged.get("model", {}).get("image", {}).get("image_size")
    if size is not None and isinstance(merged.get("data"), dict):
        merged["data"]["image_size"] = size


def resolve_eval_config(checkpoint: Path | None, overrides: Sequence[str]) -> tuple[ExperimentConfig, str]:
    """The evaluation config and a phrase saying where its model config came from (for error messages)."""
    from mlip_fed.config_compose import compose_experiment

    found = saved_config(checkpoint) if checkpoint is not None else None
    if found is None:
        where = "the overrides (no saved config beside the checkpoint)" if checkpoint is not None else "the overrides"
        return compose_experiment(list(overrides)), where
    saved, origin = found
    return layer_overrides(saved, overrides, origin), origin
