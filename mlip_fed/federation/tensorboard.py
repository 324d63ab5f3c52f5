"""Per-round TensorBoard scalars of a federated run, from the round record the coordinator already keeps.

The record (``results.json``'s ``history``) stays the source of truth; this only mirrors it into event
files under ``<output_dir>/tensorboard`` so runs can be compared in a dashboard
(``tensorboard --logdir runs/``). Tags:

* ``round/train_loss``, ``round/num_updates``, ``round/bank_updated``;
* ``eval/<metric>`` for the server's evaluation (linear-probe AUROC, R@5, ...), on evaluated rounds;
* ``site_eval/<metric>`` for the sites' aggregated evaluation and ``site_eval/<site_id>/<metric>`` for each site's;
* ``site/<site_id>/<metric>``: each site's reported metrics (loss parts, examples, steps, seconds, epsilon);
* ``epsilon/<site_id>``: each DP site's sample-level epsilon spent so far;
* ``bytes/<direction>`` and ``seconds/<part>``: communication and the round's time split.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite scalars of one round record, by tag."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[tag] = float(value)

    for key in ("train_loss", "num_updates", "num_sampled", "bank_updated"):
        put(f"round/{key}", record.get(key))
    for key, value in (record.get("eval") or {}).items():
        put(f"eval/{key}", value)
    site_eval = record.get("site_eval") or {}
    for key, value in (site_eval.get("metrics") or {}).items():
        put(f"site_eval/{key}", value)
    for site in site_eval.get("sites", []):
        for key, value in site.items():
            if key != "site_id":
                put(f"site_eval/{site.get('site_id', 'unknown')}/{key}", value)
    for site in record.get("sites", []):
        site_id = site.get("site_id", "unknown")
        for key, value in site.items():
            if key != "site_id":
                put(f"site/{site_id}/{key}", value)
    for site_id, epsilon in (record.get("epsilon") or {}).items():
        put(f"epsilon/{site_id}", epsilon)
    for key, value in (record.get("bytes") or {}).items():
        if not isinstance(value, list):
            put(f"bytes/{key}", value)
    for key, value in (record.get("seconds") or {}).items():
        put(f"seconds/{key}", value)
    return out


class RoundWriter:
    """Writes each completed round's scalars at step = round number; flushed every round (a crash loses none)."""

    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError(
                f"train.tensorboard=true needs the 'tensorboard' package ({err}); reinstall the project's "
                "dependencies or set train.tensorboard=false"
            ) from err
        self.log_dir = Path(output_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        weakref.finalize(self, self._writer.close)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for tag, value in round_scalars(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
