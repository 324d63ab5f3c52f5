"""Global ITC with the divergence encoder: hand value, invariances, soft targets, EMA, queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlip_fed.model.objectives.global_itc import GlobalITC, ema_update_, soft_target_itc_loss


def test_hand_value_2x2_hard_targets() -> None:
    eye = torch.eye(2)
    loss = soft_target_itc_loss(eye, eye, temperature=1.0)
    expected = math.log(1 + math.exp(-1))  # -log(e / (e + 1)), same in both directions
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hand_value_2x2_soft_targets() -> None:
    eye = torch.eye(2)
    loss = soft_target_itc_loss(eye, eye, temperature=1.0, alpha=0.5, image_div=eye)
    p_pos = math.e / (math.e + 1)
    target_pos = 0.5 + 0.5 * p_pos
    expected = -(target_pos * math.log(p_pos) + (1 - target_pos) * math.log(1 - p_pos))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_invariant_to_joint_permutation_and_soft_targets_change_loss() -> None:
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    vd = F.normalize(v + 0.1 * torch.randn(6, 8, generator=g), dim=1)
    perm = torch.randperm(6, generator=g)
    a = soft_target_itc_loss(v, t, 0.07, alpha=0.4, image_div=vd)
    b = soft_target_itc_loss(v[perm], t[perm], 0.07, alpha=0.4, image_div=vd[perm])
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert a.item() != pytest.approx(soft_target_itc_loss(v, t, 0.07).item(), rel=1e-3)


def test_gradient_flows_to_online_not_divergence() -> None:
    v = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    t = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    vd = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    soft_target_itc_loss(v, t, 0.07, alpha=0.4, image_div=vd).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert vd.grad is None


def test_ema_update() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    ema_update_(target, online, momentum=0.9)
    assert torch.allclose(target.weight, torch.full_like(target.weight, 0.1))
    with pytest.raises(KeyError):
        ema_update_(nn.Linear(3, 2, bias=False), online, 0.9)


def test_queue_adds_negatives_and_fills() -> None:
    torch.manual_seed(0)
    module = GlobalITC(dim=8, temperature=0.07, alpha=0.4, queue_size=5)
    v = F.normalize(torch.randn(3, 8), dim=1)
    t = F.normalize(torch.randn(3, 8), dim=1)
    first = module(v, t, v)  # empty queue: plain batch loss
    assert first.item() == pytest.approx(soft_target_itc_loss(v, t, 0.07, alpha=0.4, image_div=v).item(), rel=1e-6)
    assert int(module.queue_filled) == 3
    second = module(v, t, v)
    assert second.item() > first.item()  # three more negatives per row
    module(v, t, v)
    assert int(module.queue_filled) == 5 and int(module.queue_ptr) == 4
