"""Group (DP bucket) masking in the MLIP objectives.

Convention checked here: with ``batch["group_ids"]`` every objective is a mean over the B samples of
per-sample terms that only see the sample's own group, so total(batch) = sum_g (n_g / B) total(group g).
"""

from __future__ import annotations

import pytest
import torch
from conftest import dataset_items

from mlip_fed.data.collate import MLIPCollator
from mlip_fed.model import MLIPModel, ModelConfig
from mlip_fed.model.objectives.global_itc import GlobalITC, soft_target_itc_loss
from mlip_fed.model.objectives.itm import sample_group_negatives
from mlip_fed.pipeline import model_from_config


def subset(batch: dict, idx: torch.Tensor) -> dict:
    sub = {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]) for k, v in batch.items()}
    sub["entity_words"] = sub["entity_words"][..., : int(sub["word_ids"].max()) + 1]
    return sub


@pytest.fixture(scope="module")
def model() -> MLIPModel:
    torch.set_num_threads(1)
    cfg = ModelConfig(seed=0)
    cfg = cfg.model_copy(update={"text": cfg.text.model_copy(update={"dropout": 0.0})})
    return model_from_config(cfg).train()


def test_batch_loss_is_weighted_sum_of_group_losses(model: MLIPModel) -> None:
    batch = MLIPCollator(model.tokenizer, model.kb, max_length=64, swap_prob=1.0, seed=0)(dataset_items(6))
    groups = torch.tensor([0, 0, 1, 2, 2, 3])  # groups of size <= 2: ITM negatives are deterministic
    batch["group_ids"] = groups
    with torch.no_grad():
        whole = model(batch)
        expected = {name: 0.0 for name in whole.parts}
        for g in groups.unique():
            idx = (groups == g).nonzero(as_tuple=True)[0]
            part = model(subset(batch, idx))
            for name, value in part.parts.items():
                assert torch.isfinite(value), f"{name} not finite for group {int(g)}"
                expected[name] += len(idx) / len(groups) * float(value)
    for name, value in whole.parts.items():
        assert float(value) == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name
    # Without groups the batch couples: the ITC value differs.
    with torch.no_grad():
        coupled = model({k: v for k, v in batch.items() if k != "group_ids"})
    assert float(coupled.parts["global_itc"]) != pytest.approx(float(whole.parts["global_itc"]), rel=1e-3)


def test_singleton_groups_give_finite_loss_and_gradients(model: MLIPModel) -> None:
    batch = MLIPCollator(model.tokenizer, model.kb, max_length=64, swap_prob=1.0, seed=0)(dataset_items(3))
    batch["group_ids"] = torch.tensor([0, 1, 2])
    model.zero_grad(set_to_none=True)
    out = model(batch)
    assert float(out.parts["global_itc"].detach()) == pytest.approx(0.0, abs=1e-6)  # no negatives, no contrast
    out.total.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    model.zero_grad(set_to_none=True)


def test_itc_group_mask_matches_separate_groups_and_queue_is_refused() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    vd = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    whole = soft_target_itc_loss(v, t, 0.1, alpha=0.4, image_div=vd, group_ids=groups)
    parts = 0.0
    for k in groups.unique():
        m = groups == k
        parts += m.sum() / 7 * soft_target_itc_loss(v[m], t[m], 0.1, alpha=0.4, image_div=vd[m])
    assert float(whole) == pytest.approx(float(parts), rel=1e-6)
    with pytest.raises(ValueError, match="queue"):
        GlobalITC(8, 0.1, 0.4, queue_size=4)(v, t, vd, group_ids=groups)


def test_itm_negatives_stay_in_group() -> None:
    groups = torch.tensor([0, 1, 0, 1, 1, 2])
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    for seed in range(5):
        nt, ni, has = sample_group_negatives(sim, groups, generator=torch.Generator().manual_seed(seed))
        assert has.tolist() == [True, True, True, True, True, False]
        assert (groups[nt] == groups).all() and (groups[ni] == groups).all()
        assert (nt[has] != torch.arange(6)[has]).all()
        assert int(nt[5]) == 5 and int(ni[5]) == 5
