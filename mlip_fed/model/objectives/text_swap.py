"""Text swapping (docs/method.md, "swap" rows): counterfactual reports as extra ITM negatives.

The collator builds the counterfactuals (``mlip_fed.knowledge.counterfactual.make_counterfactual``: the same
report with one clinical claim changed); ``text_swap_loss`` asks the fusion head to reject each (label 0)
against the study's own image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlip_fed.model.objectives.itm import FusionHead


def text_swap_loss(
    head: FusionHead,
    swap_tokens: torch.Tensor,
    swap_mask: torch.Tensor,
    patches: torch.Tensor,
) -> torch.Tensor:
    """CE with label 0 (not matched) for each study's image against its counterfactual report.

    Callers pass only the rows that have a counterfactual.
    """
    logits = head(swap_tokens, swap_mask, patches)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
