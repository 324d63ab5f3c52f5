"""Resolve a weights location -- a local path or a Hugging Face hub id -- without touching the network.

Why: people name pretrained models the way the hub does (``emilyalsentzer/Bio_ClinicalBERT``), and a
machine that once ran ``hf download`` (or ``from_pretrained`` online) already holds the snapshot in its
cache. Weights are never downloaded by this project (hospital machines are offline by policy), so a hub
id is looked up in the local cache only, and a miss names the id and the cache folder searched, at
start-up rather than after the data has loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``org/name`` as the hub spells it (names may contain dots: ``timm/vit_base_patch16_224.augreg_in21k``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class WeightsNotFound(FileNotFoundError):
    """A configured weights location is neither a local path nor a model in the local hub cache."""


def hub_cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` would use, read from the environment *now*.

    ``huggingface_hub.constants`` freezes the folder at import time; a site (or a test) that sets
    ``HF_HOME`` / ``HF_HUB_CACHE`` later must still be honoured.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` with hub characters only; a local path that happens to look like one is tried first."""
    return bool(_HUB_ID.match(value))


def hub_snapshot(repo_id: str, *, field: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (``local_files_only``); WeightsNotFound naming id and cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise WeightsNotFound(
            f"{field}={repo_id!r}: no such local path, and no snapshot of hub model {repo_id!r} in the local "
            f"Hugging Face cache {cache} (weights are never downloaded). On a machine with network run "
            f"`hf download {repo_id}` with the same HF_HOME and copy {cache} here, or point {field} at a local "
            f"copy of the model folder [{type(err).__name__}]"
        ) from None
    return Path(folder)


def resolve_weights_location(value: str, *, field: str) -> Path:
    """A local file or folder as given, else the cached snapshot of the hub id ``value``.

    ``field`` is the config key shown in errors (``model.text.checkpoint_dir``), so the message says
    what to change.
    """
    path = Path(value).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(value):
        return hub_snapshot(value, field=field)
    raise WeightsNotFound(f"{field}: no such file or directory {path} (weights are never downloaded)")
