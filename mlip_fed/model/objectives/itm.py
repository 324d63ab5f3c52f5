"""Image-text matching with a small cross-attention fusion head and ITC-sampled hard negatives (docs/method.md).

Attention is written with ``nn.Linear`` q/k/v rather than ``nn.MultiheadAttention``, so Opacus
hooks it directly (no DPMultiheadAttention swap, no state-dict schema change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttentionLayer(nn.Module):
    """Pre-norm: text tokens self-attend, cross-attend to patch tokens, then an MLP.

    Split in two so a caller can share work across pairs: ``self_attend`` reads the text only and
    ``image_keys`` the image only, so with 3N (text, image) pairs over N texts and N images each is
    computed once per text / image and gathered, not once per pair.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"itm: fusion width {dim} is not divisible by itm.fusion_heads={heads}")
        self.heads = heads
        self.norm_self = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """PyTorch's fused ``scaled_dot_product_attention`` (one kernel instead of matmul, scale, mask, softmax,
        matmul). Every row attends to at least its [CLS] key, so masking with -inf equals the former finite fill."""
        b, lq, d = q.shape
        h = self.heads
        q, k, v = (t.reshape(b, t.shape[1], h, d // h).transpose(1, 2) for t in (q, k, v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, lq, d)

    def self_attend(self, text: torch.Tensor, text_mask: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """The residual self-attention block. ``first_only`` returns the [CLS] row alone ([N, 1, D]): past this
        point no row reads another, so when only [CLS] is classified (the last layer) the other rows are dead work."""
        q, k, v = self.self_qkv(self.norm_self(text)).chunk(3, dim=-1)
        if first_only:
            q, text = q[:, :1], text[:, :1]
        return text + self.self_out(self._attention(q, k, v, text_mask))

    def image_keys(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of projected patch tokens."""
        k, v = self.cross_kv(image).chunk(2, dim=-1)
        return k, v

    def attend_image(self, x: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-attention to the image keys/values, then the MLP (both residual)."""
        x = x + self.cross_out(self._attention(self.cross_q(self.norm_cross(x)), *keys, None))
        return x + self.mlp(self.norm_mlp(x))

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, first_only: bool = False
    ) -> torch.Tensor:
        return self.attend_image(self.self_attend(text, text_mask, first_only), self.image_keys(image))


class FusionHead(nn.Module):
    """Text tokens (pre-projection) attend to patch tokens (pre-projection, mapped to the text width).

    The fused [CLS] goes to Linear(2): matched / not matched. Pairs are given by index: pair k is text
    ``text_index[k]`` with image ``image_index[k]`` (default: row k with row k). The first layer's text-only
    and image-only work runs once per distinct text and image, and only [CLS] goes through the last layer's
    cross-attention and MLP; the logits are those of running every pair through every layer in full.
    """

    def __init__(self, text_dim: int, image_dim: int, layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, text_dim)
        self.layers = nn.ModuleList(CrossAttentionLayer(text_dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(text_dim)
        self.classifier = nn.Linear(text_dim, 2)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        patches: torch.Tensor,
        text_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = text_mask.bool()
        image = self.image_proj(patches)
        last = len(self.layers) - 1
        first = self.layers[0]
        x = first.self_attend(text_tokens, mask, first_only=last == 0)
        keys = first.image_keys(image)
        if text_index is not None:
            x, mask = x[text_index], mask[text_index]
        if image_index is not None:
            image, keys = image[image_index], (keys[0][image_index], keys[1][image_index])
        x = first.attend_image(x, keys)
        for i, layer in enumerate(self.layers[1:], start=1):
            x = layer(x, mask, image, first_only=i == last)
        return self.classifier(self.norm(x[:, 0]))


@torch.no_grad()
def sample_negatives(
    similarity: torch.Tensor, generator: torch.Generator | None = None, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image and one negative image per text, ∝ softmax(similarity), positive excluded.

    ``similarity`` [N, N] image-to-text (any scale; pass ITC logits). Needs N >= 2. Sampling runs where
    ``similarity`` is (no device-to-host copy in the step), from ``generator`` or that device's default generator
    (seeded by ``torch.manual_seed``); a generator on another device moves the sampling to that device.
    """
    n = similarity.shape[0]
    if n < 2:
        raise ValueError("ITM negatives need at least 2 pairs in the batch")
    sim = similarity.detach().float().to(_sampling_device(similarity, generator))
    if not hard:
        sim = torch.zeros_like(sim)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    weights_i2t = torch.softmax(sim.masked_fill(eye, float("-inf")), dim=1)
    weights_t2i = torch.softmax(sim.t().masked_fill(eye, float("-inf")), dim=1)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text.to(similarity.device), neg_image.to(similarity.device)


@torch.no_grad()
def sample_group_negatives(
    similarity: torch.Tensor, group_ids: torch.Tensor, generator: torch.Generator | None = None, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``sample_negatives`` but within ``group_ids`` only. Returns (neg_text, neg_image, has_negative [N]).

    Each row draws from its own row of weights, so one group's draw never depends on another group's data.
    """
    n = similarity.shape[0]
    if group_ids.shape != (n,):
        raise ValueError(f"ITM negatives: group_ids must have shape [{n}], got {tuple(group_ids.shape)}")
    where = _sampling_device(similarity, generator)
    groups = group_ids.detach().to(where)
    eye = torch.eye(n, dtype=torch.bool, device=where)
    candidates = (groups.unsqueeze(0) == groups.unsqueeze(1)) & ~eye
    has_negative = candidates.any(dim=1)
    sim = similarity.detach().float().to(where)
    if not hard:
        sim = torch.zeros_like(sim)
    # A row without candidates gets itself (probability 1) so multinomial stays valid; its rows are weighted 0.
    allowed = candidates | (eye & ~has_negative.unsqueeze(1))
    weights_i2t = torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)
    weights_t2i = torch.softmax(sim.t().masked_fill(~allowed, float("-inf")), dim=1)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    dev = similarity.device
    return neg_text.to(dev), neg_image.to(dev), has_negative.to(dev)


def _sampling_device(similarity: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Sample on the similarity's device unless the given generator lives elsewhere (``multinomial`` needs both on one
    device)."""
    return similarity.device if generator is None else generator.device


def itm_loss(
    head: FusionHead,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    patches: torch.Tensor,
    neg_text: torch.Tensor | None,
    neg_image: torch.Tensor | None,
    has_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE over N positive pairs + N (image, hard text) + N (hard image, text) pairs; negatives may be None (N=1).

    With ``has_negative`` [N] (group mode) the loss is the mean over samples of each sample's mean CE over its
    available rows: samples without a negative contribute their positive row only.
    """
    n = text_tokens.shape[0]
    rows = torch.arange(n, device=text_tokens.device)
    text_index, image_index = [rows], [rows]
    labels = [torch.ones(n, dtype=torch.long, device=text_tokens.device)]
    if neg_text is not None and neg_image is not None:
        text_index += [neg_text, rows]
        image_index += [rows, neg_image]
        labels += [torch.zeros_like(labels[0]), torch.zeros_like(labels[0])]
    logits = head(text_tokens, text_mask, patches, torch.cat(text_index), torch.cat(image_index))
    if has_negative is None:
        return F.cross_entropy(logits, torch.cat(labels))
    if neg_text is None:
        raise ValueError("itm_loss: has_negative given without negatives")
    per_row = F.cross_entropy(logits, torch.cat(labels), reduction="none").view(3, n)
    valid = has_negative.to(per_row.dtype)
    per_sample = (per_row[0] + valid * (per_row[1] + per_row[2])) / (1 + 2 * valid)
    return per_sample.mean()
