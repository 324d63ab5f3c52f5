"""Supervised ceiling: label policies (masking), loss decreasing on a tiny batch, config and model wiring."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_fed.config import ConfigError
from mlip_fed.config_compose import compose_experiment
from mlip_fed.knowledge.kb import CHEXPERT_CATEGORIES
from mlip_fed.model.config import ModelConfig, ObjectivesConfig, ProjectionConfig, TextEncoderConfig
from mlip_fed.model.objectives.supervised import SupervisedHead, masked_bce_loss, supervised_targets

NAN = math.nan
K = len(CHEXPERT_CATEGORIES)


def _labels() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, -1.0, NAN], [NAN, -1.0, 1.0, 0.0]])


def test_targets_and_mask_under_each_policy() -> None:
    targets, mask = supervised_targets(_labels())  # defaults: uncertain masked, blank negative
    assert targets.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    assert mask.tolist() == [[1, 1, 0, 1], [1, 0, 1, 1]]
    targets, mask = supervised_targets(_labels(), uncertain="mask", blank="mask")
    assert mask.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    targets, mask = supervised_targets(_labels(), uncertain="positive", blank="negative")
    assert targets.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]] and bool(mask.all())
    targets, mask = supervised_targets(_labels(), uncertain="negative")
    assert targets.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]] and bool(mask.all())
    with pytest.raises(ValueError, match="'maybe'"):
        supervised_targets(_labels(), uncertain="maybe")  # type: ignore[arg-type]


def test_masked_entries_do_not_change_the_loss_or_get_gradient() -> None:
    logits = torch.randn(2, 4, requires_grad=True)
    loss = masked_bce_loss(logits, _labels(), uncertain="mask", blank="mask")
    loss.backward()
    assert logits.grad is not None
    masked = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.all(logits.grad[masked] == 0) and torch.all(logits.grad[~masked] != 0)
    # Changing a masked logit leaves the loss unchanged; the loss is the mean over the 4 kept entries.
    moved = logits.detach().clone()
    moved[masked] += 5.0
    again = masked_bce_loss(moved, _labels(), uncertain="mask", blank="mask")
    assert again.item() == pytest.approx(loss.item(), abs=1e-6)
    kept = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.detach()[~masked], torch.tensor([1.0, 0.0, 1.0, 0.0]), reduction="mean"
    )
    assert loss.item() == pytest.approx(kept.item(), abs=1e-6)
    # Nothing kept: a zero loss, not NaN.
    none_kept = masked_bce_loss(logits, torch.full((2, 4), NAN), blank="mask")
    assert none_kept.item() == 0.0


def test_grouped_loss_is_a_sum_of_per_group_terms() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K, generator=g)
    labels = torch.randint(-1, 2, (6, K), generator=g).float()
    labels[0, :3] = NAN
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    whole = masked_bce_loss(logits, labels, group_ids=groups)
    parts = sum(
        (groups == k).sum()
        / 6
        * masked_bce_loss(logits[groups == k], labels[groups == k], group_ids=groups[groups == k])
        for k in range(3)
    )
    assert whole.item() == pytest.approx(float(parts), rel=1e-6)


def test_loss_decreases_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    features = torch.randn(8, 16)
    labels = torch.randint(0, 2, (8, K)).float()
    labels[0, 0], labels[1, 1], labels[2, 2] = -1.0, NAN, -1.0
    head = SupervisedHead(16, K)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = head.loss(features, labels).item()
    for _ in range(50):
        opt.zero_grad()
        head.loss(features, labels).backward()
        opt.step()
    assert head.loss(features, labels).item() < 0.5 * first


def _tiny_model_config(**objectives: object) -> ModelConfig:
    return ModelConfig(
        text=TextEncoderConfig(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64),
        projection=ProjectionConfig(dim=32, hidden=64),
        objectives=ObjectivesConfig.model_validate(objectives),
    )


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 2, (n, K), generator=g).float()
    labels[:, 5] = NAN
    return {"image": torch.randn(n, 1, 64, 64, generator=g), "labels": labels}


SUPERVISED_ONLY = {
    name: {"enabled": False} for name in ("global_itc", "local_alignment", "category_contrast", "itm", "text_swap")
} | {"supervised": {"enabled": True}}


def test_model_trains_the_image_tower_only_and_loss_decreases() -> None:
    from mlip_fed.pipeline import model_from_config

    model = model_from_config(_tiny_model_config(**SUPERVISED_ONLY))
    assert model.supervised_head is not None
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "supervised_head"}
    batch = _batch()  # no tokens: the report is never read
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = model(batch)
    assert set(first.parts) == {"supervised"} and first.total.item() == pytest.approx(first.parts["supervised"].item())
    for _ in range(15):
        opt.zero_grad()
        model(batch).total.backward()
        opt.step()
    assert model(batch).total.item() < first.total.item()
    with pytest.raises(KeyError, match="labels"):
        model({"image": batch["image"]})


def test_supervised_off_by_default_leaves_the_model_unchanged() -> None:
    from mlip_fed.pipeline import model_from_config

    plain = model_from_config(_tiny_model_config())
    assert plain.supervised_head is None and not ObjectivesConfig().supervised.enabled
    assert not any(k.startswith("supervised_head") for k in plain.state_dict())
    # Turned on next to the MLIP objectives, every other initial weight stays the same (the head is built last).
    both = model_from_config(_tiny_model_config(supervised={"enabled": True}))
    ref = plain.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in both.state_dict().items() if k in ref)


def test_config_group_composes() -> None:
    cfg = compose_experiment(["experiment=synth_cpu", "objectives=supervised"])
    objectives = cfg.model.objectives
    assert objectives.enabled_names() == ["supervised"] and not objectives.uses_text()
    assert objectives.supervised.uncertain == "mask" and objectives.supervised.blank == "negative"
    cfg = compose_experiment(["objectives=supervised", "objectives.supervised.blank=mask"])
    assert cfg.model.objectives.supervised.blank == "mask"
    with pytest.raises(ConfigError, match="supervised.uncertain"):
        compose_experiment(["objectives=supervised", "objectives.supervised.uncertain=sometimes"])
    with pytest.raises(ConfigError, match="every objective is disabled"):
        compose_experiment(["objectives=supervised", "objectives.supervised.enabled=false"])
