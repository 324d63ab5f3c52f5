"""The cheaper ITM and counterfactual paths compute what the full per-pair computation computes.

The fusion head shares text-only and image-only work across pairs and runs only [CLS] through its last
layer; the counterfactual loss outside DP encodes only the rows that have a counterfactual. Each is
checked here against the plain computation, values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dataset_items

from mlip_fed.model.objectives.itm import FusionHead, itm_loss


def _reference_logits(
    head: FusionHead, tokens: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor
) -> torch.Tensor:
    """Every row through every layer in full, [CLS] classified at the end (the head before the fast path)."""
    x, image = tokens, head.image_proj(patches)
    for layer in head.layers:
        x = layer(x, mask.bool(), image)
    return head.classifier(head.norm(x[:, 0]))


@pytest.mark.parametrize("layers", [1, 2])
def test_fusion_pairs_by_index_equal_full_per_pair_computation(layers: int) -> None:
    torch.manual_seed(0)
    head = FusionHead(text_dim=16, image_dim=8, layers=layers, heads=4)
    tokens, patches = torch.randn(4, 6, 16), torch.randn(4, 5, 8)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    text_index, image_index = torch.tensor([0, 1, 2, 3, 2, 0]), torch.tensor([0, 3, 1, 3, 2, 2])
    fast = head(tokens, mask, patches, text_index, image_index)
    full = _reference_logits(head, tokens[text_index], mask[text_index], patches[image_index])
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_itm_loss_gradients_equal_full_per_pair_computation() -> None:
    torch.manual_seed(1)
    head = FusionHead(text_dim=16, image_dim=8, layers=1, heads=4)
    tokens = torch.randn(3, 5, 16, requires_grad=True)
    patches = torch.randn(3, 4, 8, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.long)
    neg_text, neg_image = torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])
    fast = itm_loss(head, tokens, mask, patches, neg_text, neg_image)
    fast_grads = torch.autograd.grad(fast, [tokens, patches, *head.parameters()])
    rows = torch.arange(3)
    ti, ii = torch.cat([rows, neg_text, rows]), torch.cat([rows, rows, neg_image])
    logits = _reference_logits(head, tokens[ti], mask[ti], patches[ii])
    labels = torch.cat([torch.ones(3), torch.zeros(6)]).long()
    full = torch.nn.functional.cross_entropy(logits, labels)
    full_grads = torch.autograd.grad(full, [tokens, patches, *head.parameters()])
    torch.testing.assert_close(fast, full)
    for a, b in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_counterfactual_loss_on_valid_rows_equals_masked_mean_over_all_rows() -> None:
    """Outside DP only the rows with a counterfactual are encoded; the loss is the masked mean over all B rows."""
    from mlip_fed.data.collate import MLIPCollator
    from mlip_fed.model import ModelConfig
    from mlip_fed.pipeline import model_from_config

    torch.manual_seed(0)
    model = model_from_config(ModelConfig.model_validate({"seed": 0, "text": {"dropout": 0.0}})).train()
    reports = [
        "Small left pleural effusion. No pneumothorax.",
        "No acute cardiopulmonary process.",
        "Right lower lobe consolidation concerning for pneumonia.",
        "Heart size is normal. Lungs are clear.",
    ]
    items = dataset_items(len(reports), reports=reports, second_view=False, positives=False)
    batch = MLIPCollator(model.tokenizer, model.kb, max_length=64, swap_prob=1.0, seed=0)(items)
    valid = batch["swap_valid"].bool()
    assert 0 < int(valid.sum()) < len(reports)  # some rows have a counterfactual, some do not
    patches = model.encode_image(batch["image"]).patch_features
    fast = model._text_swap(batch, patches)
    # The plain computation: all B rows through the towers, CE masked to the valid rows.
    swap = model.text_encoder(batch["swap_input_ids"], batch["swap_attention_mask"])
    logits = model.fusion(swap.tokens, batch["swap_attention_mask"], patches)
    per_row = torch.nn.functional.cross_entropy(logits, torch.zeros(len(reports), dtype=torch.long), reduction="none")
    full = (per_row * valid.float()).sum() / valid.sum()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
