"""Text tower: a BERT from ``BertConfig`` (CPU default) or a local BERT checkpoint directory.

Besides [CLS] and token states it returns MGCA's word-level view: word-pieces summed into words,
and per-word importance weights from the last layer's [CLS] attention. Position and token-type
ids are always passed with a batch dimension: HF's default ``position_ids`` buffer has shape
[1, L], which makes Opacus' Embedding grad sampler silently produce wrong per-sample shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

from mlip_fed.model.config import TextEncoderConfig


@dataclass
class TextFeatures:
    """Pre-projection outputs of the text tower."""

    pooled: torch.Tensor  # [B, Dt] last-layer [CLS]
    tokens: torch.Tensor  # [B, L, Dt]
    words: torch.Tensor  # [B, M, Dt] sum of each word's pieces
    word_mask: torch.Tensor  # [B, M] bool
    #: MGCA omega: [CLS]->token attention (last layer, mean over heads), merged per word, clipped to the
    #: 10th-90th percentile of the report's words and normalised to sum 1. No gradient.
    word_weights: torch.Tensor  # [B, M]


def build_bert(cfg: TextEncoderConfig, vocab_size: int, pad_token_id: int) -> BertModel:
    """A BERT without pooler (an unused pooler would leave parameters without gradients under DP)."""
    if cfg.checkpoint_dir is not None:
        path = Path(cfg.checkpoint_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"text.checkpoint_dir: no such directory {path} (models are never downloaded)")
        bert = BertModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", add_pooling_layer=False
        )
        if cfg.checkpoint_layers is not None:
            n_layers = len(bert.encoder.layer)
            if cfg.checkpoint_layers > n_layers:
                raise ValueError(f"text.checkpoint_layers={cfg.checkpoint_layers} but {path} has {n_layers} layers")
            bert.encoder.layer = bert.encoder.layer[: cfg.checkpoint_layers]
            bert.config.num_hidden_layers = cfg.checkpoint_layers
        return bert
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_length,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=pad_token_id,
        type_vocab_size=1,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)


class TextEncoder(nn.Module):
    """BERT plus word merging and token importance."""

    def __init__(self, cfg: TextEncoderConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.bert = build_bert(cfg, vocab_size=len(tokenizer), pad_token_id=int(tokenizer.pad_token_id))
        self.hidden_size = int(self.bert.config.hidden_size)
        self.max_length = min(cfg.max_length, int(self.bert.config.max_position_embeddings))
        self.pooling = cfg.pooling
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        # Per vocabulary id: 1 = continues the previous word ("##..."), 0 = starts a word, -1 = special token.
        kind = torch.tensor(
            [-1 if i in special else int(t.startswith("##")) for i, t in enumerate(tokens)], dtype=torch.long
        )
        self.register_buffer("_piece_kind", kind, persistent=False)

    def word_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Word index per token (-1 for special and padding), the same rule the collator uses for entity spans."""
        kind = self._piece_kind[input_ids]
        starts = (kind == 0) & attention_mask.bool()
        ids = torch.cumsum(starts.long(), dim=1) - 1
        valid = (kind >= 0) & attention_mask.bool() & (ids >= 0)
        return torch.where(valid, ids, torch.full_like(ids, -1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the text tower takes at most {self.max_length}"
            )
        b, length = input_ids.shape
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(b, -1)
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
            output_attentions=True,
        )
        tokens = out.last_hidden_state
        cls_attention = out.attentions[-1][:, :, 0, :].mean(dim=1).detach()  # [B, L]
        word_ids = self.word_ids(input_ids, attention_mask)
        words, word_mask = merge_word_pieces(tokens, word_ids)
        piece_weights, _ = merge_word_pieces(cls_attention.unsqueeze(-1), word_ids)
        weights = clipped_importance(piece_weights.squeeze(-1), word_mask)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        else:
            pooled = tokens[:, 0]
        return TextFeatures(pooled=pooled, tokens=tokens, words=words, word_mask=word_mask, word_weights=weights)


def merge_word_pieces(tokens: torch.Tensor, word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum word-piece states into words (MGCA). ``word_ids`` [B, L] with -1 for tokens that belong to no word.

    Returns words [B, M, D] (M = most words in any row, at least 1) and a [B, M] mask of real words.
    """
    num_words = max(int(word_ids.max().item()) + 1, 1)
    # One-hot membership with a dummy column for -1, dropped afterwards; a matmul keeps it differentiable.
    member = nn.functional.one_hot(word_ids + 1, num_classes=num_words + 1)[..., 1:].to(tokens.dtype)  # [B, L, M]
    words = torch.einsum("blm,bld->bmd", member, tokens)
    word_mask = member.sum(dim=1) > 0
    return words, word_mask


def clipped_importance(weights: torch.Tensor, mask: torch.Tensor, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """Clip each row to its [low, high] quantiles over masked-in entries, then normalise to sum 1 (MGCA)."""
    weights = weights.detach()
    masked = torch.where(mask, weights, torch.full_like(weights, float("nan")))
    lo = torch.nanquantile(masked, low, dim=1, keepdim=True)
    hi = torch.nanquantile(masked, high, dim=1, keepdim=True)
    clipped = torch.minimum(torch.maximum(weights, lo), hi)
    clipped = torch.where(mask, clipped, torch.zeros_like(clipped))
    total = clipped.sum(dim=1, keepdim=True)
    # A row whose words all carry zero attention (or no words) gets uniform weights over its words.
    uniform = mask.to(weights.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, clipped / total.clamp(min=torch.finfo(weights.dtype).tiny), uniform)
