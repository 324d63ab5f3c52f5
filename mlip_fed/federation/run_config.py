"""Flower ``run_config`` -> validated ``ExperimentConfig`` (docs/architecture.md, invariant 2).

Flower's run config stays small: an experiment name, a hydra override string, a round count and an
output dir. Everything else is composed by hydra and validated by pydantic, exactly as for
``mlip-pretrain``. Relative paths are resolved against the project root (the checkout holding
``configs/``), never against the ServerApp's working directory, which is the SuperLink's. An installed
package (a Docker image, a wheel) has no checkout: there relative paths resolve against
``$MLIP_FED_HOME``, and without it they are refused, because the only other anchor would be
``site-packages``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlip_fed.config import ConfigError, ExperimentConfig

#: Keys of ``[tool.flwr.app.config]``; anything else in the run config is refused by Flower itself.
RUN_CONFIG_KEYS = ("experiment", "overrides", "num-server-rounds", "output-dir")


@dataclass(frozen=True)
class FederationRun:
    """The composed experiment plus what only Flower's run config can say."""

    cfg: ExperimentConfig
    num_rounds: int
    output_dir: Path
    overrides: tuple[str, ...]


#: Anchor for relative output/data paths when mlip-fed runs from an installed package.
HOME_ENV_VAR = "MLIP_FED_HOME"


def project_root() -> Path | None:
    """``$MLIP_FED_HOME``, else the checkout holding ``configs/``; None for an installed package without it."""
    from mlip_fed.config_compose import config_dir

    home = os.environ.get(HOME_ENV_VAR, "").strip()
    if home:
        return Path(home).expanduser().resolve()
    configs = config_dir().resolve()
    return configs.parent if configs.name == "configs" and (configs.parent / "pyproject.toml").is_file() else None


def resolve_path(path: Path | str, root: Path | None = None, field: str = "path") -> Path:
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = root or project_root()
    if root is None:
        raise ConfigError(
            f"{field} = {str(path)!r} is relative and mlip-fed runs from an installed package (no checkout): "
            f"give an absolute path or set {HOME_ENV_VAR} to the folder relative paths should resolve against"
        )
    return (root / path).resolve()


def experiment_from_run_config(run_config: Mapping[str, object], *, resolve_paths: bool = True) -> FederationRun:
    """Compose and validate; a bad value raises ConfigError naming the run-config key or config field.

    A deployed site passes ``resolve_paths=False``: the server's output and data folders mean nothing
    there (the site YAML names its own), so they are neither resolved nor refused.
    """
    from mlip_fed.config_compose import compose_experiment, split_overrides

    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run_config: unknown key(s) {unknown}; expected {list(RUN_CONFIG_KEYS)}")
    experiment = str(run_config.get("experiment", "") or "").strip()
    overrides_text = str(run_config.get("overrides", "") or "")
    rounds_raw = run_config.get("num-server-rounds", 0)
    if isinstance(rounds_raw, bool) or not isinstance(rounds_raw, int) or rounds_raw < 0:
        raise ConfigError(f"run_config: num-server-rounds = {rounds_raw!r}: expected an integer >= 0 (0 = from config)")
    overrides = ([f"experiment={experiment}"] if experiment else []) + split_overrides(overrides_text)
    output_text = str(run_config.get("output-dir", "") or "").strip()
    if output_text:
        overrides.append(f"output_dir={output_text}")
    cfg = compose_experiment(overrides)
    num_rounds = rounds_raw or cfg.federation.num_rounds
    if not resolve_paths:
        return FederationRun(
            cfg=cfg, num_rounds=num_rounds, output_dir=Path(cfg.output_dir), overrides=tuple(overrides)
        )
    root = project_root()
    cfg = cfg.model_copy(
        update={
            "output_dir": resolve_path(cfg.output_dir, root, "output_dir"),
            "data": cfg.data.model_copy(update={"root": resolve_path(cfg.data.root, root, "data.root")}),
        }
    )
    return FederationRun(cfg=cfg, num_rounds=num_rounds, output_dir=Path(cfg.output_dir), overrides=tuple(overrides))
