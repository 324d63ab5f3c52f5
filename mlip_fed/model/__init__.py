"""MLIP model: image and text towers, projection heads and the five objectives.

Import ``MLIPModel`` from ``mlip_fed.model.mlip`` (or here); the config lives in ``mlip_fed.model.config``.
The names below load on first use: ``mlip_fed.config`` imports ``mlip_fed.model.config``, and an eager
package would drag MONAI and transformers into every process that only reads a config (``mlip-client``
validating a site YAML, the ``flwr run`` CLI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlip_fed.model.config import ModelConfig, ObjectivesConfig
    from mlip_fed.model.mlip import MLIPModel
    from mlip_fed.model.objectives.prototype_bank import PrototypeBank
    from mlip_fed.model.outputs import ImageOutput, LossOutput, TextOutput

_WHERE = {
    "ModelConfig": "mlip_fed.model.config",
    "ObjectivesConfig": "mlip_fed.model.config",
    "MLIPModel": "mlip_fed.model.mlip",
    "PrototypeBank": "mlip_fed.model.objectives.prototype_bank",
    "ImageOutput": "mlip_fed.model.outputs",
    "LossOutput": "mlip_fed.model.outputs",
    "TextOutput": "mlip_fed.model.outputs",
}

__all__ = ["ImageOutput", "LossOutput", "MLIPModel", "ModelConfig", "ObjectivesConfig", "PrototypeBank", "TextOutput"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
