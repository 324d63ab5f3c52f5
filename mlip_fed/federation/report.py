"""The run's human- and machine-readable output: progress table, results.json, results.png.

``results.json`` is rewritten atomically after every round with ``status: running``, so a run that is
killed still leaves what it completed; ``finish`` sets ``completed`` or ``failed``. The simulation
wrapper decides the exit code from this file because ``flwr run`` exits 0 even when every site failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlip_fed.io import atomic_write_bytes, atomic_write_json

RESULTS_NAME = "results.json"
PLOT_NAME = "results.png"

_COLUMNS = (("round", 5), ("sites", 7), ("loss", 8), ("AUROC", 7), ("R@5", 6), ("seconds", 8), ("failures", 8))


def table_header() -> str:
    head = " ".join(f"{name:>{width}}" for name, width in _COLUMNS)
    return f"{head}\n{'-' * len(head)}"


def headline_eval(record: dict[str, Any]) -> dict[str, Any]:
    """The round's evaluation for the table and the plot: the server's own when it ran, else the sites' aggregate."""
    return record.get("eval") or (record.get("site_eval") or {}).get("metrics") or {}


def table_row(record: dict[str, Any]) -> str:
    evaluation = headline_eval(record)
    values = (
        str(record["round"]),
        f"{record.get('num_updates', 0)}/{record.get('num_sampled', 0)}",
        _fmt(record.get("train_loss")),
        _fmt(evaluation.get("auroc")),
        _fmt(evaluation.get("r_at_5")),
        _fmt(record.get("seconds", {}).get("round"), 1),
        str(len(record.get("failures", []))),
    )
    return " ".join(f"{v:>{width}}" for v, (_, width) in zip(values, _COLUMNS, strict=True))


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def write_results(output_dir: Path, payload: dict[str, Any]) -> Path:
    return atomic_write_json(Path(output_dir) / RESULTS_NAME, _json_safe(payload))


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null (readers treat null as 'undefined')."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def plot_results(output_dir: Path, history: Sequence[dict[str, Any]], title: str) -> Path:
    """Loss, linear-probe AUROC and retrieval R@5 per round (round 0 = the initial, random-init model)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    series = (
        ("train loss", [(r["round"], r.get("train_loss")) for r in history]),
        ("linear-probe AUROC", [(r["round"], headline_eval(r).get("auroc")) for r in history]),
        ("retrieval R@5", [(r["round"], headline_eval(r).get("r_at_5")) for r in history]),
    )
    for ax, (label, points) in zip(axes, series, strict=True):
        pts = [(x, y) for x, y in points if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(Path(output_dir) / PLOT_NAME, buffer.getvalue())
