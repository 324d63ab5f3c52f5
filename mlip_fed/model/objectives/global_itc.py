"""Global image-text contrast with the divergence (EMA) image encoder (reading A: docs/method.md).

The online image embedding v and text embedding t are contrasted symmetrically. Targets are soft:
(1-alpha)*one-hot + alpha*softmax(v^d . t^d / tau), where v^d comes from an EMA copy of the image
tower and head applied to a second augmented view and t^d is the stop-gradient online text
embedding. Near-duplicate reports ("no acute cardiopulmonary process") then receive target mass
instead of being pushed apart as false negatives.

The optional queue of past divergence embeddings (MoCo/ALBEF) is off by default and forbidden
under DP: it lets one record's embedding enter the loss of later steps and other records' batches,
so neither per-record nor per-bucket clipping bounds its influence.

Groups (DP buckets): with ``group_ids`` [N], logits between samples of different groups are masked
out of every softmax (online and divergence branches), so each row's loss depends only on its own
group's members. The reduction is unchanged (mean over the N rows), hence
``loss(batch) = sum_g (n_g / N) * loss(group g alone)``. A group of one has only its positive: its
loss is exactly 0 (no NaN). The queue is refused with groups (it would couple groups and steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_itc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    *,
    alpha: float = 0.0,
    image_div: torch.Tensor | None = None,
    text_div: torch.Tensor | None = None,
    image_queue: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """½ [mean_i H(q_i2t, p_i2t) + mean_i H(q_t2i, p_t2i)] over L2-normalised [N, d] embeddings.

    With ``alpha=0`` (or no divergence embeddings) this is the plain symmetric InfoNCE (CLIP/MGCA ITA halved).
    ``image_queue``/``text_queue`` [K, d] add extra negatives (no gradient) whose target mass comes only
    from the divergence branch.
    """
    n = image.shape[0]
    if text.shape[0] != n:
        raise ValueError(f"global ITC: {n} images but {text.shape[0]} texts")
    if group_ids is not None:
        if image_queue is not None or text_queue is not None:
            raise ValueError("global ITC: a queue of past embeddings cannot be combined with group_ids (DP buckets)")
        return _grouped_itc_loss(image, text, temperature, alpha, image_div, text_div, group_ids)
    text_keys = text if text_queue is None else torch.cat([text, text_queue.to(text.dtype)], dim=0)
    image_keys = image if image_queue is None else torch.cat([image, image_queue.to(image.dtype)], dim=0)
    logits_i2t = image @ text_keys.t() / temperature  # [N, N+K]
    logits_t2i = text @ image_keys.t() / temperature
    # Identity targets (row i matches column i), built without F.one_hot's host-side range check.
    hard_i2t = torch.eye(n, logits_i2t.shape[1], dtype=image.dtype, device=image.device)
    hard_t2i = torch.eye(n, logits_t2i.shape[1], dtype=image.dtype, device=image.device)
    if alpha > 0 and image_div is not None:
        with torch.no_grad():
            t_d = (text if text_div is None else text_div).detach()
            t_keys = t_d if text_queue is None else torch.cat([t_d, text_queue.to(t_d.dtype)], dim=0)
            v_keys = image_div if image_queue is None else torch.cat([image_div, image_queue.to(image_div.dtype)], 0)
            soft_i2t = F.softmax(image_div @ t_keys.t() / temperature, dim=1)
            soft_t2i = F.softmax(t_d @ v_keys.t() / temperature, dim=1)
        target_i2t = (1 - alpha) * hard_i2t + alpha * soft_i2t
        target_t2i = (1 - alpha) * hard_t2i + alpha * soft_t2i
    else:
        target_i2t, target_t2i = hard_i2t, hard_t2i
    loss_i2t = -(target_i2t * F.log_softmax(logits_i2t, dim=1)).sum(dim=1).mean()
    loss_t2i = -(target_t2i * F.log_softmax(logits_t2i, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def _grouped_itc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    temperature: float,
    alpha: float,
    image_div: torch.Tensor | None,
    text_div: torch.Tensor | None,
    group_ids: torch.Tensor,
) -> torch.Tensor:
    """``soft_target_itc_loss`` with every cross-group logit removed (-inf before the softmax)."""
    n = image.shape[0]
    if group_ids.shape != (n,):
        raise ValueError(f"global ITC: group_ids must have shape [{n}], got {tuple(group_ids.shape)}")
    same = group_ids.to(image.device).unsqueeze(0) == group_ids.to(image.device).unsqueeze(1)
    hard = torch.eye(n, dtype=image.dtype, device=image.device)

    def masked_log_softmax(logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.masked_fill(~same, float("-inf")), dim=1)

    target_i2t = target_t2i = hard
    if alpha > 0 and image_div is not None:
        with torch.no_grad():
            t_d = (text if text_div is None else text_div).detach()
            soft_i2t = masked_log_softmax(image_div @ t_d.t() / temperature).exp()
            soft_t2i = masked_log_softmax(t_d @ image_div.t() / temperature).exp()
        target_i2t = (1 - alpha) * hard + alpha * soft_i2t
        target_t2i = (1 - alpha) * hard + alpha * soft_t2i
    logp_i2t = masked_log_softmax(image @ text.t() / temperature)
    logp_t2i = masked_log_softmax(text @ image.t() / temperature)
    # where(): off-group targets are 0 and log-probs -inf; 0 * -inf would be NaN.
    loss_i2t = -torch.where(same, target_i2t * logp_i2t, torch.zeros_like(logp_i2t)).sum(dim=1).mean()
    loss_t2i = -torch.where(same, target_t2i * logp_t2i, torch.zeros_like(logp_t2i)).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_d <- m theta_d + (1-m) theta; buffers are copied. Call after ``optimizer.step()``."""
    target_params = dict(target.named_parameters())
    pairs = []
    for name, param in online.named_parameters():
        if name not in target_params:
            raise KeyError(f"EMA update: parameter {name!r} missing from the divergence copy")
        pairs.append((target_params[name], param.detach()))
    if pairs:
        # One fused multi-tensor op instead of two small ops per parameter (the step is host-bound on small towers).
        torch._foreach_lerp_([t for t, _ in pairs], [p for _, p in pairs], 1.0 - momentum)
    target_buffers = dict(target.named_buffers())
    for name, buf in online.named_buffers():
        target_buffers[name].copy_(buf)


class GlobalITC(nn.Module):
    """Loss module holding the optional queue (buffers; no trainable parameters)."""

    def __init__(self, dim: int, temperature: float, alpha: float, queue_size: int = 0) -> None:
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha
        self.queue_size = queue_size
        if queue_size > 0:
            self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
            self.register_buffer("queue_filled", torch.zeros(1, dtype=torch.long))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_div: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if group_ids is not None:
            if self.queue_size > 0:
                raise ValueError(
                    "global ITC: objectives.global_itc.queue_size > 0 is refused with group_ids (DP buckets): a queue "
                    "of private embeddings couples groups and steps; set queue_size=0"
                )
            return soft_target_itc_loss(
                image, text, self.temperature, alpha=self.alpha, image_div=image_div, group_ids=group_ids
            )
        image_queue = text_queue = None
        if self.queue_size > 0:
            filled = int(self.queue_filled.item())
            image_queue, text_queue = self.image_queue[:filled].clone(), self.text_queue[:filled].clone()
        loss = soft_target_itc_loss(
            image,
            text,
            self.temperature,
            alpha=self.alpha,
            image_div=image_div,
            image_queue=image_queue,
            text_queue=text_queue,
        )
        if self.queue_size > 0 and self.training:
            self._enqueue(image_div if image_div is not None else image.detach(), text.detach())
        return loss

    @torch.no_grad()
    def _enqueue(self, image: torch.Tensor, text: torch.Tensor) -> None:
        n = min(image.shape[0], self.queue_size)
        ptr = int(self.queue_ptr.item())
        idx = (torch.arange(n, device=image.device) + ptr) % self.queue_size
        self.image_queue[idx] = image[:n].to(self.image_queue.dtype)
        self.text_queue[idx] = text[:n].to(self.text_queue.dtype)
        self.queue_ptr.fill_((ptr + n) % self.queue_size)
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled.item()) + n))
