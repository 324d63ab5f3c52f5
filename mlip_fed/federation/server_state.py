"""The server's global state and its atomic checkpoint.

Flower 1.42 has no resume: the round counter, the bank, the server
optimiser's moments and the per-round history are ours to persist. One file holds all of them and is
replaced atomically after every round, so a server killed at any moment restarts from the last
*completed* round, never from a half-written one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlip_fed.io import atomic_torch_save

CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "server_last.pt"


@dataclass
class ServerState:
    """Everything needed to continue a federation after the last completed round."""

    completed_round: int
    weights: dict[str, Tensor]
    bank: dict[str, Tensor]
    optimizer: dict[str, Any]
    #: One record per completed round (what results.json lists); round 0 is the initial model.
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Every site failure so far (``SiteFailure.as_dict``).
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: The validated ExperimentConfig as JSON-able data, to refuse resuming a different experiment.
    config: dict[str, Any] = field(default_factory=dict)

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "completed_round": self.completed_round,
            "weights": {k: v.detach().cpu().clone() for k, v in self.weights.items()},
            "bank": {k: v.detach().cpu().clone() for k, v in self.bank.items()},
            "optimizer": self.optimizer,
            "history": self.history,
            "failures": self.failures,
            "config": self.config,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], where: str = "checkpoint") -> ServerState:
        if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
            found = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: server checkpoint version {found!r}, expected {CHECKPOINT_VERSION}")
        missing = [k for k in ("completed_round", "weights", "bank", "optimizer", "history", "config") if k not in data]
        if missing:
            raise ValueError(f"{where}: server checkpoint lacks {missing}")
        return cls(
            completed_round=int(data["completed_round"]),
            weights=data["weights"],
            bank=data["bank"],
            optimizer=data["optimizer"],
            history=list(data["history"]),
            failures=list(data.get("failures", [])),
            config=dict(data["config"]),
        )


def checkpoint_path(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints" / CHECKPOINT_NAME


def save_server_state(state: ServerState, output_dir: Path) -> Path:
    """Atomically replace the server checkpoint (temp file, fsync, rename)."""
    return atomic_torch_save(checkpoint_path(output_dir), state.to_checkpoint())


def load_server_state(output_dir: Path) -> ServerState | None:
    """The last completed round's state, or None when this output dir has no checkpoint yet."""
    path = checkpoint_path(output_dir)
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: name it
        raise ValueError(f"cannot read server checkpoint {path}: {err}") from err
    return ServerState.from_checkpoint(data, where=str(path))


#: Config sections that must match to resume: a different model or data cannot continue these weights.
RESUME_MUST_MATCH = ("model", "data", "seed")


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume with a different model, data or seed, naming the first differing field."""
    for section in RESUME_MUST_MATCH:
        diff = _first_difference(saved.get(section), current.get(section), section)
        if diff is not None:
            raise ValueError(
                f"cannot resume from {where}: {diff}. Use a new output dir or federation.resume=false to start over."
            )


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if diff is not None:
                return diff
        return None
    if a != b:
        return f"{path} was {a!r} in the checkpoint, now {b!r}"
    return None
