"""Key layouts of published image backbones, renamed into this project's towers (pure dict work, no I/O).

Why: the ViT-B/16 and ResNet-50 weights people have come from timm or torchvision, whose key names
differ from the MONAI ViT and the GroupNorm ResNet built in ``image_encoder.py``. A plain
``load_state_dict`` then matches nothing, which used to end in random weights and a warning.

What each layout becomes (documented in docs/pretrained_weights.md):

* **ViT** (timm ``vit_base_patch16_*`` and torchvision ``vit_b_16``): patch embedding, blocks (the fused
  qkv projection has the same (q|k|v, head, dim) row order in all three), final norm. The [CLS] token
  gets the checkpoint's [CLS] position embedding added, because this tower gives [CLS] no position of
  its own (timm and torchvision add it to the token before the first block: the same input either
  way). Patch position embeddings are resized bicubically when the patch grid differs.
* **ResNet** (torchvision ``resnet50``; timm's ``resnet50`` uses the same key names): convolutions as
  they are; BatchNorm weight/bias become the GroupNorm affine weight/bias of the same layer; the
  BatchNorm running statistics are dropped (GroupNorm normalises each sample by its own statistics
  and keeps none).
* Both: the 3-channel input kernel becomes one grey channel by summing the RGB kernels; classifier
  heads are dropped (MLIP has its own projection heads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

WeightFormat = Literal["native", "timm", "torchvision"]

#: Target keys that take the image itself; a 3-channel kernel there is summed into one grey channel.
INPUT_KERNELS = ("conv1.weight", "vit.patch_embedding.patch_embeddings.weight")
VIT_POS = "vit.patch_embedding.position_embeddings"
VIT_CLS = "cls.token"

_HEAD = "classifier head (MLIP has its own projection heads)"
_BN_STATS = "BatchNorm running statistics (GroupNorm normalises each sample by its own statistics and keeps none)"

#: (source pattern, target template). First match wins; keys no rule and no drop matches are "unexpected".
_TIMM_VIT: tuple[tuple[str, str], ...] = (
    (r"patch_embed\.proj\.(weight|bias)", r"vit.patch_embedding.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"vit.blocks.\1.norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"vit.blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vit.blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vit.blocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"vit.blocks.\1.mlp.linear1.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"vit.blocks.\1.mlp.linear2.\2"),
    (r"norm\.(weight|bias)", r"vit.norm.\1"),
)
_TIMM_VIT_DROP: tuple[tuple[str, str], ...] = ((r"(head|pre_logits)\..*", _HEAD),)

_TV_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_VIT: tuple[tuple[str, str], ...] = (
    (r"conv_proj\.(weight|bias)", r"vit.patch_embedding.patch_embeddings.\1"),
    (_TV_LAYER + r"ln_1\.(weight|bias)", r"vit.blocks.\1.norm1.\2"),
    (_TV_LAYER + r"ln_2\.(weight|bias)", r"vit.blocks.\1.norm2.\2"),
    (_TV_LAYER + r"self_attention\.in_proj_weight", r"vit.blocks.\1.attn.qkv.weight"),
    (_TV_LAYER + r"self_attention\.in_proj_bias", r"vit.blocks.\1.attn.qkv.bias"),
    (_TV_LAYER + r"self_attention\.out_proj\.(weight|bias)", r"vit.blocks.\1.attn.out_proj.\2"),
    # torchvision < 0.13 named the MLP layers linear_1 / linear_2; later versions 0 / 3.
    (_TV_LAYER + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"vit.blocks.\1.mlp.linear1.\2"),
    (_TV_LAYER + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"vit.blocks.\1.mlp.linear2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"vit.norm.\1"),
)
_TORCHVISION_VIT_DROP: tuple[tuple[str, str], ...] = ((r"heads\..*", _HEAD),)

#: torchvision's ResNet names (timm's ResNet keeps them): conv/bn weights keep their key; BN affine -> GN affine.
_RESNET: tuple[tuple[str, str], ...] = (
    (r"(conv1\.weight|bn1\.(?:weight|bias))", r"\1"),
    (r"(layer\d+\.\d+\.(?:conv\d+|bn\d+|downsample\.[01])\.(?:weight|bias))", r"\1"),
)
_RESNET_DROP: tuple[tuple[str, str], ...] = (
    (r".*\.(running_mean|running_var|num_batches_tracked)", _BN_STATS),
    (r"fc\..*", _HEAD),
)


@dataclass
class Conversion:
    """Source tensors under the tower's key names, plus what was left out and why."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    #: Source keys left out on purpose, with the reason (classifier heads, BatchNorm statistics).
    dropped: dict[str, str] = field(default_factory=dict)
    #: Source keys no rule knows: reported as unexpected.
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def detect_format(state: Mapping[str, Tensor]) -> tuple[WeightFormat, str]:
    """(layout, family) from the key names: family is "vit", "resnet" or "unknown".

    ResNets in torchvision's layout share this project's key names; they are told apart by what only
    a BatchNorm checkpoint has (running statistics, a classifier ``fc``, a 3-channel ``conv1``).
    """
    keys = set(state)
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.0.attn.") for k in keys):
        return "timm", "vit"
    if "conv_proj.weight" in keys or any(k.startswith("encoder.layers.encoder_layer_") for k in keys):
        return "torchvision", "vit"
    if any(k.startswith("vit.") for k in keys):
        return "native", "vit"
    if "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys):
        conv1 = state.get("conv1.weight")
        bn_checkpoint = any(k.endswith(".running_mean") for k in keys) or "fc.weight" in keys
        rgb = conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3
        return ("torchvision" if bn_checkpoint or rgb else "native"), "resnet"
    return "native", "unknown"


def convert(
    state: Mapping[str, Tensor], fmt: WeightFormat, family: str, target: Mapping[str, torch.Size]
) -> Conversion:
    """Rename ``state`` (layout ``fmt``) into the tower whose key shapes are ``target``.

    ``family`` is the tower's ("vit" or "resnet"): a ViT checkpoint offered to a ResNet simply maps
    nothing, and the caller's loaded-fraction check refuses it.
    """
    if fmt == "native":
        out = Conversion(tensors=dict(state))
    elif family == "resnet":
        out = _rename(state, _RESNET, _RESNET_DROP)
    elif fmt == "timm":
        out = _rename(state, _TIMM_VIT, _TIMM_VIT_DROP, special=("cls_token", "pos_embed"))
        _vit_tokens(out, state.get("cls_token"), state.get("pos_embed"), target)
    else:
        out = _rename(state, _TORCHVISION_VIT, _TORCHVISION_VIT_DROP, special=("class_token", "encoder.pos_embedding"))
        _vit_tokens(out, state.get("class_token"), state.get("encoder.pos_embedding"), target)
    _grey_input(out, target)
    return out


def _rename(
    state: Mapping[str, Tensor],
    rules: Sequence[tuple[str, str]],
    drops: Sequence[tuple[str, str]],
    special: Sequence[str] = (),
) -> Conversion:
    out = Conversion()
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    dropped = [(re.compile(pattern), reason) for pattern, reason in drops]
    for key, tensor in state.items():
        if key in special:
            continue
        for pattern, template in compiled:
            if pattern.fullmatch(key):
                out.tensors[pattern.sub(template, key)] = tensor
                break
        else:
            reason = next((r for p, r in dropped if p.fullmatch(key)), None)
            if reason is None:
                out.unused.append(key)
            else:
                out.dropped[key] = reason
    if any(reason == _BN_STATS for reason in out.dropped.values()):
        out.notes.append("BatchNorm weight/bias loaded as GroupNorm affine weight/bias; running statistics dropped")
    return out


def _vit_tokens(out: Conversion, cls: Tensor | None, pos: Tensor | None, target: Mapping[str, torch.Size]) -> None:
    """[CLS] token and position embeddings: fold the [CLS] position into the token, resize the patch grid."""
    if pos is None or VIT_POS not in target:
        if cls is not None:
            out.tensors[VIT_CLS] = cls
        return
    n = int(pos.shape[1])
    order = (1, 0, 2) if cls is not None else (0, 1, 2)
    prefix = next((p for p in order if n - p > 0 and math.isqrt(n - p) ** 2 == n - p), None)
    if prefix is None:
        raise ValueError(f"position embedding of {n} tokens is not a square patch grid plus 0-2 prefix tokens")
    if cls is not None:
        out.tensors[VIT_CLS] = cls + pos[:, :1] if prefix >= 1 else cls
        if prefix >= 1:
            out.notes.append("[CLS] position embedding added to the [CLS] token (this tower gives [CLS] no position)")
    if prefix > 1:
        out.notes.append(f"position embeddings of {prefix - 1} extra prefix token(s) dropped (no such token here)")
    grid = pos[:, prefix:]
    side = math.isqrt(n - prefix)
    target_n = int(target[VIT_POS][1])
    target_side = math.isqrt(target_n)
    if side != target_side and target_side**2 == target_n:
        dim = grid.shape[-1]
        square = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
        resized = F.interpolate(square, size=(target_side, target_side), mode="bicubic", align_corners=False)
        grid = resized.permute(0, 2, 3, 1).reshape(1, target_n, dim).to(pos.dtype)
        out.notes.append(f"patch position embeddings resized {side}x{side} -> {target_side}x{target_side} (bicubic)")
    out.tensors[VIT_POS] = grid


def _grey_input(out: Conversion, target: Mapping[str, torch.Size]) -> None:
    """Sum a 3-channel input kernel into the grey tower's single channel (an RGB image with R=G=B=x)."""
    for key in INPUT_KERNELS:
        weight = out.tensors.get(key)
        if weight is None or key not in target or weight.ndim != 4:
            continue
        if weight.shape[1] == 3 and target[key][1] == 1:
            out.tensors[key] = weight.sum(dim=1, keepdim=True)
            out.notes.append(f"{key}: RGB kernels summed into one grey channel")
