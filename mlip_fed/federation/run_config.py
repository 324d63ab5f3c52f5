"""Flower ``run_config`` -> validated ``ExperimentConfig`` (DESIGN.md, invariant 2).

Flower's run config stays small: an experiment name, a hydra override string, a round count and an
output dir. Everything else is composed by hydra and validated by pydantic, exactly as for
``mlip-pretrain``. Relative paths are resolved against the project root (the directory holding
``configs/``), never against the ServerApp's working directory, which is the SuperLink's.
"""

from __future__ import annotations

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


def project_root() -> Path:
    from mlip_fed.cli.hydra_config import config_dir

    return config_dir().resolve().parent


def resolve_path(path: Path | str, root: Path | None = None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else ((root or project_root()) / path).resolve()


def experiment_from_run_config(run_config: Mapping[str, object]) -> FederationRun:
    """Compose and validate; a bad value raises ConfigError naming the run-config key or config field."""
    from mlip_fed.cli.hydra_config import compose_experiment, split_overrides

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
    root = project_root()
    cfg = cfg.model_copy(
        update={
            "output_dir": resolve_path(cfg.output_dir, root),
            "data": cfg.data.model_copy(update={"root": resolve_path(cfg.data.root, root)}),
        }
    )
    num_rounds = rounds_raw or cfg.federation.num_rounds
    return FederationRun(cfg=cfg, num_rounds=num_rounds, output_dir=Path(cfg.output_dir), overrides=tuple(overrides))
