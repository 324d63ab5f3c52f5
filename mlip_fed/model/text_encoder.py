"""Text tower: a BERT from ``BertConfig`` (CPU default) or a pretrained ``AutoModel`` (folder or cached hub id).

Besides [CLS] and token states it returns MGCA's word-level view: word-pieces summed into words,
and per-word importance weights from the last layer's [CLS] attention. Position and token-type
ids are passed with a batch dimension whenever the backbone takes them: HF's default ``position_ids``
buffer has shape [1, L], which makes Opacus' Embedding grad sampler silently produce wrong
per-sample shapes. Word merging follows WordPiece's ``##`` rule; with another tokenizer (BPE,
SentencePiece) every token is its own "word".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerBase

from mlip_fed.model.config import TextEncoderConfig

if TYPE_CHECKING:
    from mlip_fed.model.pretrained_weights import WeightLoadReport


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
    """The from-scratch BERT, without pooler (an unused pooler would leave parameters without gradients under DP)."""
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


#: Where encoder-only ``AutoModel``s keep their transformer layers (BERT/RoBERTa/ELECTRA, DistilBERT, others).
_LAYER_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")


def load_text_checkpoint(cfg: TextEncoderConfig) -> tuple[PreTrainedModel, WeightLoadReport]:
    """``AutoModel`` from ``cfg.checkpoint_dir`` (a folder or a cached hub id), offline, with a load report.

    BERT loads without its pooler, as before; any other model's pooler is removed after loading (unused,
    it would leave parameters without gradients under DP). ``checkpoint_layers`` keeps the first N
    transformer layers of any model whose layer list is found. Refused (PretrainedWeightsError) when less than
    ``checkpoint_min_loaded`` of the model's tensors came from the checkpoint.
    """
    from transformers import AutoConfig, AutoModel

    from mlip_fed.hf_cache import resolve_weights_location
    from mlip_fed.model.pretrained_weights import PretrainedWeightsError, enforce_loaded, text_load_report

    field = "model.text.checkpoint_dir"
    assert cfg.checkpoint_dir is not None
    path = resolve_weights_location(cfg.checkpoint_dir, field=field)
    source = cfg.checkpoint_dir if str(path) == cfg.checkpoint_dir else f"{cfg.checkpoint_dir} ({path})"
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        extra: dict[str, Any] = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        model, info = AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager", output_loading_info=True, **extra
        )
    except (OSError, ValueError, KeyError) as err:
        raise PretrainedWeightsError(
            f"{field}={source}: not a transformers model folder this version can load: {err}"
        ) from None
    notes = []
    if isinstance(getattr(model, "pooler", None), nn.Module):
        model.pooler = None
        notes.append("pooler removed (unused by MLIP)")
    report = text_load_report(model, info, source=source, model_type=config.model_type, notes=notes)
    if cfg.checkpoint_layers is not None:
        report.notes.append(_truncate_layers(model, cfg.checkpoint_layers, source))
    enforce_loaded(
        report, field=field, min_field="model.text.checkpoint_min_loaded", min_loaded=cfg.checkpoint_min_loaded
    )
    return model, report


def _truncate_layers(model: PreTrainedModel, keep: int, source: str) -> str:
    for dotted in _LAYER_LISTS:
        *parents, name = dotted.split(".")
        owner: Any = model
        for part in parents:
            owner = getattr(owner, part, None)
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList):
            if keep > len(layers):
                raise ValueError(f"text.checkpoint_layers={keep} but {source} has {len(layers)} layers")
            setattr(owner, name, layers[:keep])
            if hasattr(model.config, "num_hidden_layers"):
                model.config.num_hidden_layers = keep
            return f"kept the first {keep} of {len(layers)} layers (text.checkpoint_layers)"
    raise ValueError(
        f"text.checkpoint_layers={keep}: no layer list ({', '.join(_LAYER_LISTS)}) in {type(model).__name__}; "
        "unset checkpoint_layers for this model"
    )


class TextEncoder(nn.Module):
    """A BERT (or any encoder ``AutoModel``) plus word merging and token importance.

    The backbone is the attribute ``bert`` whatever its type, so checkpoint keys stay ``text_encoder.bert.*``.
    """

    def __init__(self, cfg: TextEncoderConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        #: Set by ``use_sdpa``: the backbone runs PyTorch's fused attention, which returns no attention maps, so the
        #: last layer's [CLS] attention is recomputed from that layer's input (``_cls_attention``). Set first: the
        #: load probe below already runs the backbone.
        self._sdpa_attention: Any = None
        #: What was loaded from ``cfg.checkpoint_dir`` (None: built from scratch).
        self.load_report: WeightLoadReport | None = None
        if cfg.checkpoint_dir is None:
            self.bert: PreTrainedModel = build_bert(
                cfg, vocab_size=len(tokenizer), pad_token_id=int(tokenizer.pad_token_id)
            )
        else:
            self.bert, self.load_report = load_text_checkpoint(cfg)
        accepted = inspect.signature(self.bert.forward).parameters
        self._pass_token_types = "token_type_ids" in accepted
        self._pass_positions = "position_ids" in accepted
        embeddings = getattr(self.bert, "embeddings", None)
        #: RoBERTa-style models number positions from padding_idx + 1 (and give padding padding_idx); None: from 0.
        self._position_padding_idx: int | None = (
            int(embeddings.padding_idx)
            if hasattr(embeddings, "create_position_ids_from_input_ids") and hasattr(embeddings, "padding_idx")
            else None
        )
        self.hidden_size = int(self.bert.config.hidden_size)
        max_positions = int(getattr(self.bert.config, "max_position_embeddings", cfg.max_length))
        if self._position_padding_idx is not None:
            max_positions -= self._position_padding_idx + 1
        self.max_length = min(cfg.max_length, max_positions)
        if cfg.checkpoint_dir is not None:
            self._probe(int(tokenizer.pad_token_id or 0))
        self.pooling = cfg.pooling
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        # Per vocabulary id: 1 = continues the previous word ("##..."), 0 = starts a word, -1 = special token.
        kind = torch.tensor(
            [-1 if i in special else int(t.startswith("##")) for i, t in enumerate(tokens)], dtype=torch.long
        )
        self.register_buffer("_piece_kind", kind, persistent=False)

    def use_sdpa(self) -> bool:
        """Run a BERT backbone with ``scaled_dot_product_attention`` instead of eager attention (one fused kernel per
        layer instead of matmul, mask, softmax, dropout, matmul). Returns False, changing nothing, for a backbone
        whose last layer does not expose BERT's ``attention.self.query/key`` (it stays eager)."""
        layers = getattr(getattr(self.bert, "encoder", None), "layer", None)
        attention = getattr(getattr(layers[-1], "attention", None), "self", None) if layers else None
        if not all(hasattr(attention, a) for a in ("query", "key", "num_attention_heads", "attention_head_size")):
            return False
        self.bert.set_attn_implementation("sdpa")
        self._sdpa_attention = attention
        return True

    @torch.no_grad()
    def _cls_attention(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's [CLS]->token attention, mean over heads ([B, L]), from that layer's input ``hidden``:
        what eager attention returns, before attention dropout. The projections are called functionally (no module
        hooks fire, so Opacus records nothing extra); [CLS]'s query only, so this costs one key projection."""
        attn = self._sdpa_attention
        b, length, _ = hidden.shape
        heads, size = int(attn.num_attention_heads), int(attn.attention_head_size)
        q = nn.functional.linear(hidden[:, :1], attn.query.weight, attn.query.bias).view(b, 1, heads, size)
        k = nn.functional.linear(hidden, attn.key.weight, attn.key.bias).view(b, length, heads, size)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * size**-0.5
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)[:, :, 0, :].mean(dim=1)

    def word_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Word index per token (-1 for special and padding), the same rule the collator uses for entity spans."""
        kind = self._piece_kind[input_ids]
        starts = (kind == 0) & attention_mask.bool()
        ids = torch.cumsum(starts.long(), dim=1) - 1
        valid = (kind >= 0) & attention_mask.bool() & (ids >= 0)
        return torch.where(valid, ids, torch.full_like(ids, -1))

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The backbone's outputs (token states and attentions), with batch-shaped position and token-type ids.

        BERT gets ``token_type_ids`` = 0 and ``position_ids`` = 0..L-1 per row; another model gets each of those
        only if its ``forward`` takes it, with RoBERTa-style offsets where its embeddings use them.
        """
        kwargs: dict[str, torch.Tensor] = {}
        if self._pass_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        if self._pass_positions:
            if self._position_padding_idx is not None:
                make = self.bert.embeddings.create_position_ids_from_input_ids
                kwargs["position_ids"] = make(input_ids, self._position_padding_idx)
            else:
                b, length = input_ids.shape
                kwargs["position_ids"] = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(b, -1)
        sdpa = self._sdpa_attention is not None
        out = self.bert(
            input_ids=input_ids,
            attention_mask=self._prepared_mask(attention_mask),
            output_attentions=not sdpa,
            output_hidden_states=sdpa,
            **kwargs,
        )
        maps = getattr(out, "hidden_states" if sdpa else "attentions", None)
        if getattr(out, "last_hidden_state", None) is None or not maps:
            raise ValueError(
                f"text model {type(self.bert).__name__} returns no last_hidden_state/attentions; MLIP needs an encoder "
                "whose outputs have token states and (eager) attention maps"
            )
        return out

    def _prepared_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """For a ``BertModel``, the [B, 1, 1, L] mask its attention applies, built here: given the 2-d mask,
        transformers checks whether any token is padding (``mask.all()``) to drop the mask, a device-to-host read
        per text pass. Boolean for SDPA; additive (0 or the dtype's minimum) for eager attention, as transformers
        builds it. Other backbones get the 2-d mask."""
        if not isinstance(self.bert, BertModel):
            return attention_mask
        keep = attention_mask.bool()[:, None, None, :]
        if self._sdpa_attention is not None:
            return keep
        dtype = self.bert.embeddings.word_embeddings.weight.dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    @torch.no_grad()
    def _probe(self, token_id: int) -> None:
        """One 2-token pass in eval mode (no dropout, so the seeded RNG is untouched): a checkpoint whose model
        cannot serve as the text tower fails at start-up, not at the first batch."""
        was_training = self.bert.training
        self.bert.eval()
        try:
            ids = torch.full((1, 2), token_id, dtype=torch.long, device=next(self.bert.parameters()).device)
            self.backbone(ids, torch.ones_like(ids))
        finally:
            self.bert.train(was_training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        if input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens; the text tower takes at most {self.max_length}"
            )
        out = self.backbone(input_ids, attention_mask)
        tokens = out.last_hidden_state
        if self._sdpa_attention is not None:
            cls_attention = self._cls_attention(out.hidden_states[-2].detach(), attention_mask)  # [B, L]
        else:
            cls_attention = out.attentions[-1][:, :, 0, :].mean(dim=1).detach()  # [B, L]
        word_ids = self.word_ids(input_ids, attention_mask)
        # M = L (a row has at most as many words as tokens): a shape known without reading word_ids back from the
        # device; the extra columns are masked out everywhere words are used (and the collator pads spans to L too).
        num_words = input_ids.shape[1]
        words, word_mask = merge_word_pieces(tokens, word_ids, num_words)
        piece_weights, _ = merge_word_pieces(cls_attention.unsqueeze(-1), word_ids, num_words)
        weights = clipped_importance(piece_weights.squeeze(-1), word_mask)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        else:
            pooled = tokens[:, 0]
        return TextFeatures(pooled=pooled, tokens=tokens, words=words, word_mask=word_mask, word_weights=weights)


def merge_word_pieces(
    tokens: torch.Tensor, word_ids: torch.Tensor, num_words: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum word-piece states into words (MGCA). ``word_ids`` [B, L] with -1 for tokens that belong to no word.

    Returns words [B, M, D] and a [B, M] mask of real words. M is ``num_words`` when given (at least the most words
    of any row; the text tower passes L so that no device-to-host read is needed), else the most words in any row
    (at least 1), which reads ``word_ids`` back from the device.
    """
    if num_words is None:
        num_words = max(int(word_ids.max().item()) + 1, 1)
    # One-hot membership (-1 matches no word); a matmul keeps it differentiable. A comparison, not F.one_hot, which
    # reads the ids' range back to the host to check it.
    slots = torch.arange(num_words, device=word_ids.device)
    member = (word_ids.unsqueeze(-1) == slots).to(tokens.dtype)  # [B, L, M]
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
