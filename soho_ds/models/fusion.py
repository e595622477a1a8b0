"""Cross-modal transformer: transformers' BERT layers over [text tokens ; visual tokens]."""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from soho_ds.config import ModelConfig, resolve_local_dir

# What ModelConfig describes of a BERT; a pretrained folder must agree on each.
_SIZES = {"hidden_size": "hidden_size", "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
          "vocab_size": "vocab_size", "max_position": "max_position_embeddings"}
# What ModelConfig does not describe, so a pretrained folder must use BertConfig's defaults.
_FIXED = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2, "position_embedding_type": "absolute"}


def bert_config(cfg: ModelConfig) -> BertConfig:
    return BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      max_position_embeddings=cfg.max_position, **_FIXED)


def _check_pretrained(found: BertConfig, cfg: ModelConfig) -> None:
    """The folder's architecture must be the one ModelConfig states, so that the saved model config
    alone rebuilds it (an exported model carries no BERT folder)."""
    wrong = [f"model.{ours} {getattr(cfg, ours)} vs {theirs} {getattr(found, theirs)}"
             for ours, theirs in _SIZES.items() if getattr(cfg, ours) != getattr(found, theirs)]
    wrong += [f"{k} {getattr(found, k, None)!r} (supported: {v!r})" for k, v in _FIXED.items()
              if getattr(found, k, v) != v]
    if found.num_hidden_layers < cfg.num_layers:
        wrong.append(f"model.num_layers {cfg.num_layers} vs num_hidden_layers {found.num_hidden_layers}")
    if wrong:
        raise ValueError(f"{cfg.bert_dir}: does not match the model config: {'; '.join(wrong)}")


class CrossModalEncoder(nn.Module):
    """Single-stream fusion: words (token type 0) and visual tokens (type 1) in one BERT encoder.

    With `cfg.bert_dir` the first `num_layers` layers of a local pretrained BERT are loaded
    (`from_pretrained`); otherwise they start from a random initialisation of the same shape.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bert_dir:
            path = resolve_local_dir(cfg.bert_dir)
            _check_pretrained(BertConfig.from_pretrained(path, local_files_only=True), cfg)
            self.bert = BertModel.from_pretrained(path, add_pooling_layer=cfg.pooling == "cls", local_files_only=True,
                                                  num_hidden_layers=cfg.num_layers, hidden_dropout_prob=cfg.dropout,
                                                  attention_probs_dropout_prob=cfg.dropout)
        else:
            self.bert = BertModel(bert_config(cfg), add_pooling_layer=cfg.pooling == "cls")
        if cfg.grad_checkpointing:
            self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.config = self.bert.config
        self.pooling = cfg.pooling

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def visual_type_embedding(self) -> torch.Tensor:
        return self.bert.embeddings.token_type_embeddings.weight[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The words alone through the same layers (no visual tokens), mean-pooled over the real tokens
        -> (T, H). The mean, not [CLS]: it carries the sentence from any layer (sentence encoders such as
        MiniLM are trained with it; a truncated stack's [CLS] says little)."""
        hidden = self._encode(self.bert.embeddings(input_ids=input_ids), attention_mask)
        w = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)

    def _encode(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The BERT layers over embedded tokens (T, S, H), `valid` (T, S) 1 where a token is real. The
        mask is always built: transformers' shortcut for masks without padding reads the mask on the
        host (a device sync every step)."""
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=valid,
                                         allow_is_bidirectional_skip=False)
        return self.bert.encoder(hidden, attention_mask=mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_tokens: torch.Tensor,
                visual_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (T, L); visual_tokens (T, N, H) already embedded; visual_mask (T, N),
        True where a token is real (padding cells are never attended to).

        Returns the output sequence (T, L+N, H) and the pooled [CLS] vector (T, H).
        """
        text = self.bert.embeddings(input_ids=input_ids)  # word + position + type 0, LayerNorm
        hidden = torch.cat([text, visual_tokens.to(text.dtype)], dim=1)
        if visual_mask is None:
            visual_mask = attention_mask.new_ones(visual_tokens.shape[:2])
        valid = torch.cat([attention_mask, visual_mask.to(attention_mask.dtype)], dim=1)
        sequence = self._encode(hidden, valid)
        if self.pooling == "mean":
            w = valid.to(sequence.dtype)[..., None]
            return sequence, (sequence * w).sum(1) / w.sum(1).clamp(min=1)
        if self.pooling == "raw_cls":
            return sequence, sequence[:, 0]
        return sequence, self.bert.pooler(sequence)
