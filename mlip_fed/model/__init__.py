"""MLIP model: image and text towers, projection heads and the five objectives.

Import ``MLIPModel`` from ``mlip_fed.model.mlip`` (or here); the config lives in ``mlip_fed.model.config``.
"""

from mlip_fed.model.config import ModelConfig, ObjectivesConfig
from mlip_fed.model.mlip import MLIPModel
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.model.outputs import ImageOutput, LossOutput, TextOutput

__all__ = ["ImageOutput", "LossOutput", "MLIPModel", "ModelConfig", "ObjectivesConfig", "PrototypeBank", "TextOutput"]
