"""Compose hydra YAML into a validated ``ExperimentConfig``.

Hydra only assembles the tree (groups and overrides); pydantic decides what is valid. We use
hydra's compose API rather than ``@hydra.main`` so the CLIs, the Flower apps and the tests share
one code path and nobody's working directory is changed behind their back. It sits beside ``mlip_fed.config``
(the schema layer, docs/architecture.md) so the federation and the runners compose configs without importing the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlip_fed.config import ConfigError, ExperimentConfig, validate_experiment

CONFIG_ENV_VAR = "MLIP_FED_CONFIG_DIR"


def config_dir() -> Path:
    """The hydra config tree: ``$MLIP_FED_CONFIG_DIR``, the packaged copy, or the checkout's ``configs/``."""
    override = os.environ.get(CONFIG_ENV_VAR)
    candidates = [Path(override)] if override else []
    package_dir = Path(__file__).resolve().parent
    candidates += [package_dir / "_configs", package_dir.parent / "configs"]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"no hydra config tree found (looked in {', '.join(str(c) for c in candidates)})")


def compose_raw(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The composed, interpolated config as plain data (before validation)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = compose(config_name="config", overrides=[_force(o) for o in overrides])
            raw = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose config from overrides {list(overrides)}: {err}") from None
    assert isinstance(raw, dict)
    # The `objectives` group sits at the top level for short overrides (objectives.itm.enabled=false);
    # the schema keeps it inside the model it configures.
    # An override spelt with the schema's own path (model.objectives.itm.enabled=false, as error messages name it)
    # lands in model.objectives: it is applied on top of the group, not dropped.
    objectives = raw.pop("objectives", None)
    if objectives is not None:
        model = raw.setdefault("model", {})
        model["objectives"] = _merged(objectives, model.get("objectives") or {})
    return raw


def _merged(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s values on top, nested dicts merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _force(override: str) -> str:
    """``a.b=v`` → ``++a.b=v``: the YAML need not list every schema default to make it overridable.

    A misspelt key is still caught, by the schema (``extra="forbid"``), with the field's full path.
    """
    key = override.split("=", 1)[0]
    if "=" in override and "." in key and not key.startswith(("+", "~")):
        return "++" + override
    return override


def compose_experiment(overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Compose and validate; a bad override raises ConfigError naming the field, value and reason."""
    shown = " ".join(overrides) if overrides else "(defaults)"
    return validate_experiment(compose_raw(overrides), origin=f"config [{shown}]")


def split_overrides(text: str) -> list[str]:
    """Flower's run_config carries overrides as one string: "a=1 b.c='x y'"."""
    import shlex

    return shlex.split(text) if text.strip() else []
