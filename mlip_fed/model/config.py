"""Pydantic schema for the MLIP model and its five objectives.

The project-wide config (``mlip_fed/config.py``) embeds ``ModelConfig``; keeping the model's own
schema here lets the model be built and tested without the rest of the stack. Every default is
tagged with its source in ``docs/method.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ImageArch = Literal["vit_tiny", "resnet_tiny", "resnet50", "vit_b16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageEncoderConfig(_Strict):
    arch: ImageArch = "vit_tiny"
    image_size: int = Field(default=64, ge=16)
    #: ViT patch size; ignored by the ResNets (their patch grid comes from layer3).
    patch_size: int = Field(default=8, ge=2)
    #: Backbone weights: a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, a model folder, or a hub id
    #: (``timm/vit_base_patch16_224.augreg_in21k``) found in the local Hugging Face cache. Never downloaded.
    pretrained_path: str | None = None
    #: Key layout of that file: ``auto`` tells them apart by key names; ``native`` is this tower's own
    #: ``state_dict``; ``timm`` / ``torchvision`` are their ViT-B/16 and ResNet-50 layouts (docs/pretrained_weights.md).
    pretrained_format: Literal["auto", "native", "timm", "torchvision"] = "auto"
    #: Strict: every tensor of the tower loaded and no checkpoint tensor left unused (classifier heads and
    #: BatchNorm statistics are dropped on purpose and do not count). False accepts a partial load of at least
    #: ``pretrained_min_loaded``; anything less is refused at start-up, never a warning.
    pretrained_strict: bool = True
    #: Smallest share of the tower's tensors that must come from the checkpoint when ``pretrained_strict=false``.
    pretrained_min_loaded: float = Field(default=0.9, ge=0.0, le=1.0)
    #: Bias on the ViT's fused qkv projection. timm's and torchvision's ViT-B/16 have one (``vit_b16.yaml`` sets
    #: it); the from-scratch CPU tower does not (MONAI's default).
    qkv_bias: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: ViT global feature: mean of the patch tokens or the [CLS] token. A randomly initialised [CLS] output
    #: is nearly the same for every image, which stalls contrastive training from scratch; mean pooling does
    #: not. MGCA uses [CLS] on a pretrained DeiT. ResNets always average-pool.
    pooling: Literal["mean", "cls"] = "mean"

    @model_validator(mode="after")
    def _patch_divides(self) -> ImageEncoderConfig:
        if self.arch.startswith("vit") and self.image_size % self.patch_size:
            raise ValueError(
                f"image.image_size={self.image_size} is not divisible by image.patch_size={self.patch_size}"
            )
        return self


class TextEncoderConfig(_Strict):
    #: Pretrained text model: a local model folder or a hub id (``emilyalsentzer/Bio_ClinicalBERT``) found in the
    #: local Hugging Face cache; any ``AutoModel`` that returns token states, loaded with ``local_files_only=True``
    #: together with its own tokenizer. None builds a small BERT from the sizes below and the packaged vocabulary.
    checkpoint_dir: str | None = None
    #: Use only the first N layers of a checkpoint (MGCA keeps 6 of Bio_ClinicalBERT's 12). None keeps all.
    checkpoint_layers: int | None = Field(default=None, ge=1)
    #: Smallest share of the text model's tensors that must come from the checkpoint; less is refused at start-up.
    checkpoint_min_loaded: float = Field(default=0.9, ge=0.0, le=1.0)
    #: Vocabulary file for the from-scratch tower; None = the packaged public-text vocabulary.
    vocab_path: str | None = None
    num_layers: int = Field(default=4, ge=1)
    hidden_size: int = Field(default=128, ge=8)
    num_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=256, ge=8)
    max_length: int = Field(default=128, ge=8)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    #: Report feature: masked mean of the token states, or the [CLS] state (MGCA, with a pretrained BERT).
    #: From scratch, [CLS] is near-constant across reports (pairwise cosine 0.9999 measured) and the global
    #: contrast stays at log(batch); mean pooling learns.
    pooling: Literal["mean", "cls"] = "mean"

    @model_validator(mode="after")
    def _heads_divide(self) -> TextEncoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text.hidden_size={self.hidden_size} is not divisible by text.num_heads={self.num_heads}")
        return self


class ProjectionConfig(_Strict):
    dim: int = Field(default=128, ge=8)
    hidden: int = Field(default=256, ge=8)
    #: LayerNorm instead of MGCA's BatchNorm: BN couples samples in a batch and is refused by Opacus.
    norm: Literal["layernorm", "none"] = "layernorm"


class GlobalITCConfig(_Strict):
    enabled: bool = True
    weight: float = Field(default=1.0, ge=0.0)
    temperature: float = Field(default=0.07, gt=0.0)
    #: EMA "divergence" image encoder on a second view giving soft targets (reading A, ALBEF momentum distillation: docs/method.md).
    divergence: bool = True
    momentum: float = Field(default=0.995, ge=0.0, le=1.0)
    alpha: float = Field(default=0.4, ge=0.0, le=1.0)
    #: MoCo-style queue of divergence embeddings; 0 = off. Forbidden under DP (it mixes records across steps).
    queue_size: int = Field(default=0, ge=0)


class LocalAlignmentConfig(_Strict):
    enabled: bool = True
    weight: float = Field(default=1.0, ge=0.0)
    temperature: float = Field(default=0.1, gt=0.0)
    bidirectional: bool = True
    #: Enrich word tokens with knowledge tokens over the entity span (span-aligned addition).
    knowledge: bool = True
    #: Weight of the knowledge->patch term inside the local loss; 0 disables it.
    knowledge_patch_weight: float = Field(default=1.0, ge=0.0)
    max_entities: int = Field(default=8, ge=1)


class CategoryContrastConfig(_Strict):
    enabled: bool = True
    weight: float = Field(default=1.0, ge=0.0)
    num_free_prototypes: int = Field(default=500, ge=0)
    epsilon: float = Field(default=0.05, gt=0.0)
    sinkhorn_iters: int = Field(default=3, ge=1)
    temperature: float = Field(default=0.2, gt=0.0)
    #: eta: weight of the report's expert labels in the codes.
    label_mix: float = Field(default=0.3, ge=0.0, le=1.0)
    #: Knowledge prototypes stay at their KB-text initialisation (identical at every site).
    freeze_knowledge_prototypes: bool = True
    #: A category seen fewer times than this across sites keeps its previous bank value.
    bank_min_count: float = Field(default=5.0, ge=0.0)


class ITMConfig(_Strict):
    enabled: bool = True
    weight: float = Field(default=1.0, ge=0.0)
    fusion_layers: int = Field(default=1, ge=1, le=4)
    fusion_heads: int = Field(default=4, ge=1)
    #: Sample negatives proportional to softmax(ITC similarity); False samples uniformly.
    hard_negatives: bool = True


class TextSwapConfig(_Strict):
    """Counterfactual reports as hard negatives: for the ITM head when it is on, otherwise contrasted with
    the true report on the global embedding (``softplus((v·t_swap − v·t)/τ)``)."""

    enabled: bool = True
    weight: float = Field(default=0.5, ge=0.0)
    prob: float = Field(default=0.5, ge=0.0, le=1.0)
    max_edits: int = Field(default=1, ge=1, le=4)


class SupervisedConfig(_Strict):
    """Supervised ceiling (not part of MLIP; ``objectives=supervised``): a linear 14-way head on the image tower's
    pooled feature, BCE on the batch's CheXpert labels (``model/objectives/supervised.py``)."""

    enabled: bool = False
    weight: float = Field(default=1.0, ge=0.0)
    #: Uncertain (-1) labels: left out of the loss (U-Ignore), or counted as positive (U-Ones) / negative (U-Zeros).
    uncertain: Literal["mask", "positive", "negative"] = "mask"
    #: Blank (not mentioned) labels: negative (CheXpert's convention and the linear probe's) or left out of the loss.
    blank: Literal["negative", "mask"] = "negative"


class ObjectivesConfig(_Strict):
    global_itc: GlobalITCConfig = GlobalITCConfig()
    local_alignment: LocalAlignmentConfig = LocalAlignmentConfig()
    category_contrast: CategoryContrastConfig = CategoryContrastConfig()
    itm: ITMConfig = ITMConfig()
    text_swap: TextSwapConfig = TextSwapConfig()
    supervised: SupervisedConfig = SupervisedConfig()

    @model_validator(mode="after")
    def _something_on(self) -> ObjectivesConfig:
        if not self.enabled_names():
            raise ValueError("objectives: every objective is disabled; enable at least one")
        return self

    def enabled_names(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name).enabled]

    def uses_text(self) -> bool:
        """Whether any enabled objective reads the report (all but the supervised ceiling do)."""
        return any(name != "supervised" for name in self.enabled_names())


class ModelConfig(_Strict):
    image: ImageEncoderConfig = ImageEncoderConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    projection: ProjectionConfig = ProjectionConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    #: Knowledge base file; None = the packaged CheXpert-14 KB.
    kb_path: str | None = None
    #: Seeds parameter init and hard-negative sampling, so every site builds identical initial weights.
    seed: int = 0
