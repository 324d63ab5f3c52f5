"""MLIPModel end to end: shapes, gradients on every trainable parameter, no BatchNorm, NaN naming."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import dataset_items
from torch import nn

from mlip_fed.data.collate import MLIPCollator
from mlip_fed.model import MLIPModel, ModelConfig
from mlip_fed.model.objectives.prototype_bank import PrototypeBank
from mlip_fed.pipeline import model_from_config


@pytest.fixture(scope="module")
def vit_model() -> MLIPModel:
    torch.set_num_threads(1)
    return model_from_config(ModelConfig(seed=0))


@pytest.fixture(scope="module")
def batch(vit_model: MLIPModel) -> dict:
    return MLIPCollator(vit_model.tokenizer, vit_model.kb, max_length=64, swap_prob=1.0, seed=0)(dataset_items(4))


def _check_all_grads(model: MLIPModel, batch: dict) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    assert set(out.parts) == {"global_itc", "local_alignment", "category_contrast", "itm", "text_swap"}
    assert torch.isfinite(out.total)
    out.total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in model.named_parameters() if n.startswith("divergence_")]
    assert frozen and all(not dict(model.named_parameters())[n].requires_grad for n in frozen)
    assert all(dict(model.named_parameters())[n].grad is None for n in frozen)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_vit_forward_backward_every_parameter_gets_grad(vit_model: MLIPModel, batch: dict) -> None:
    n_params = sum(p.numel() for p in vit_model.parameters() if p.requires_grad)
    assert 1_000_000 <= n_params <= 3_000_000
    assert bool(batch["swap_valid"].any())
    _check_all_grads(vit_model, batch)


def test_resnet_tiny_groupnorm_every_parameter_gets_grad(batch: dict) -> None:
    model = model_from_config(ModelConfig.model_validate({"image": {"arch": "resnet_tiny"}}))
    assert any(isinstance(m, nn.GroupNorm) for m in model.image_encoder.modules())
    _check_all_grads(model, batch)


def test_encode_shapes(vit_model: MLIPModel, batch: dict) -> None:
    vit_model.eval()
    with torch.no_grad():
        img = vit_model.encode_image(batch["image"])
        txt = vit_model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.pooled.shape == (4, 128) and img.embedding.shape == (4, 128)
    assert img.grid == (8, 8) and img.patches.shape == (4, 64, 128)
    assert torch.allclose(img.patches.norm(dim=-1), torch.ones(4, 64), atol=1e-5)
    assert torch.allclose(img.patch_weights.sum(dim=1), torch.ones(4), atol=1e-5)
    m = txt.words.shape[1]
    assert txt.embedding.shape == (4, 128) and txt.words.shape == (4, m, 128)
    # M = L word slots (a shape known without a device read); the real words are the masked-in ones.
    assert m == batch["entity_words"].shape[2] == batch["input_ids"].shape[1]
    assert int(txt.word_mask.sum(dim=1).max()) == int(batch["word_ids"].max()) + 1
    assert torch.allclose(txt.word_weights.sum(dim=1), torch.ones(4), atol=1e-5)
    assert (txt.word_weights[~txt.word_mask] == 0).all()


def test_entity_spans_cover_the_mentioned_words(vit_model: MLIPModel, batch: dict) -> None:
    tokens = vit_model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    ids = batch["entity_ids"][0][batch["entity_mask"][0]].tolist()
    names = [vit_model.kb.concepts[i].id for i in ids]
    assert "pleural_effusion" in names
    e = names.index("pleural_effusion")
    words = batch["entity_words"][0, e].nonzero().flatten().tolist()
    spanned = [t for t, w in zip(tokens, batch["word_ids"][0].tolist(), strict=True) if w in words]
    assert "".join(spanned).replace("##", "") == "pleuraleffusion"


def test_nan_objective_is_named(vit_model: MLIPModel, batch: dict) -> None:
    bad = dict(batch)
    bad["labels"] = batch["labels"].clone()
    vit_model.train()
    with torch.no_grad():
        vit_model.category_contrast.knowledge.weight[0, 0] = math.nan  # type: ignore[union-attr]
        out = vit_model(bad)
        vit_model.init_knowledge_prototypes()
    assert out.nonfinite() == ["category_contrast"]


def test_missing_second_view_in_training_is_an_error(vit_model: MLIPModel, batch: dict) -> None:
    no_view = {k: v for k, v in batch.items() if k != "image_view2"}
    vit_model.train()
    with pytest.raises(KeyError, match="image_view2"):
        vit_model(no_view)
    vit_model.eval()
    with torch.no_grad():
        assert torch.isfinite(vit_model(no_view).total)


def test_seeded_construction_is_identical_and_ema_moves(vit_model: MLIPModel) -> None:
    state = torch.random.get_rng_state()
    other = model_from_config(ModelConfig(seed=0))
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    a, b = other.state_dict(), model_from_config(ModelConfig(seed=0)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(
        other.category_contrast.knowledge.weight,  # type: ignore[union-attr]
        model_from_config(ModelConfig(seed=0)).category_contrast.knowledge.weight,  # type: ignore[union-attr]
    )
    with torch.no_grad():
        for p in other.image_encoder.parameters():
            p.add_(1.0)
    before = other.divergence_image_encoder.cls.token.clone()  # type: ignore[union-attr]
    other.update_divergence_encoder()
    after = other.divergence_image_encoder.cls.token  # type: ignore[union-attr]
    assert torch.allclose(after - before, torch.full_like(before, 0.005), atol=1e-6)


def test_ablation_config_freezes_unused_heads(batch: dict) -> None:
    cfg = ModelConfig.model_validate(
        {
            "objectives": {
                "local_alignment": {"enabled": False},
                "itm": {"enabled": False},
                "text_swap": {"enabled": False},
            }
        }
    )
    model = model_from_config(cfg).train()
    out = model(batch)
    assert set(out.parts) == {"global_itc", "category_contrast"}
    out.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="every objective is disabled"):
        ModelConfig.model_validate(
            {"objectives": {name: {"enabled": False} for name in type(cfg.objectives).model_fields}}
        )


def test_prototype_bank_sync(vit_model: MLIPModel) -> None:
    bank = PrototypeBank(dim=128)
    emb = torch.nn.functional.normalize(torch.randn(5, 128), dim=1)  # 5 = the default bank_min_count
    labels = torch.full((5, 14), math.nan)
    labels[:, 2] = 1.0
    bank.accumulate(emb, emb, labels)
    vit_model.prototype_bank.merge([bank])
    before = vit_model.category_contrast.knowledge.weight.clone()  # type: ignore[union-attr]
    mask = vit_model.sync_knowledge_prototypes_from_bank()
    after = vit_model.category_contrast.knowledge.weight  # type: ignore[union-attr]
    assert mask.nonzero().flatten().tolist() == [2]
    assert torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])
    vit_model.init_knowledge_prototypes()


def test_collator_swaps_are_seeded(vit_model: MLIPModel) -> None:
    col = MLIPCollator(vit_model.tokenizer, vit_model.kb, max_length=64, swap_prob=0.5, seed=3)
    a, b = col(dataset_items(8)), col(dataset_items(8))
    assert torch.equal(a["swap_input_ids"], b["swap_input_ids"])
    col.set_epoch(1)
    random.seed(0)
    assert torch.equal(col(dataset_items(8))["input_ids"], a["input_ids"])


def test_text_swap_without_itm_contrasts_the_counterfactual(batch: dict) -> None:
    """ITM off: swaps are per-sample hard negatives on the global embedding, softplus((v·t_swap − v·t)/τ)."""
    cfg = ModelConfig.model_validate({"objectives": {"itm": {"enabled": False}}})
    model = model_from_config(cfg)
    assert model.fusion is None
    model.eval()  # no dropout: the loss is then a function of the embeddings alone
    out = model(batch)
    assert set(out.parts) == {"global_itc", "local_alignment", "category_contrast", "text_swap"}
    with torch.no_grad():
        v = model.encode_image(batch["image"]).embedding
        t = model.encode_text(batch["input_ids"], batch["attention_mask"]).embedding
        s = model.encode_text(batch["swap_input_ids"], batch["swap_attention_mask"]).embedding
    valid = batch["swap_valid"].bool()
    tau = cfg.objectives.global_itc.temperature
    expected = torch.nn.functional.softplus(((v * s).sum(-1) - (v * t).sum(-1)) / tau)[valid].mean()
    assert float(out.parts["text_swap"]) == pytest.approx(float(expected), rel=1e-5)
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).parts["text_swap"].backward()
    assert model.text_global_head.net[0].weight.grad is not None
    assert model.image_global_head.net[0].weight.grad is not None
