"""Cross-modal transformer: transformers' BERT layers over [text tokens ; visual tokens]."""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from soho_ds.runtime.config import resolve_local_dir


def bert_config(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, dropout: float,
                vocab_size: int, max_position: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, intermediate_size=intermediate_size,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      max_position_embeddings=max_position, type_vocab_size=2)


class CrossModalEncoder(nn.Module):
    """Single-stream fusion: words (token type 0) and visual tokens (type 1) in one BERT encoder.

    `bert_dir` loads a local pretrained BERT (e.g. bert-base-uncased) with `from_pretrained`;
    otherwise the layers start from `config`'s random initialisation.
    """

    def __init__(self, config: BertConfig | None = None, bert_dir: str | None = None,
                 grad_checkpointing: bool = False, num_layers: int | None = None):
        super().__init__()
        if bert_dir:
            path = resolve_local_dir(bert_dir)
            found = BertConfig.from_pretrained(path, local_files_only=True)
            if num_layers and num_layers > found.num_hidden_layers:
                raise ValueError(f"{bert_dir}: has {found.num_hidden_layers} layers, model.num_layers asks {num_layers}")
            # fewer layers than the checkpoint: the first num_layers pretrained layers are kept
            self.bert = BertModel.from_pretrained(path, add_pooling_layer=True, local_files_only=True,
                                                  num_hidden_layers=num_layers or found.num_hidden_layers)
        else:
            self.bert = BertModel(config, add_pooling_layer=True)
        if grad_checkpointing:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.config = self.bert.config

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def visual_type_embedding(self) -> torch.Tensor:
        return self.bert.embeddings.token_type_embeddings.weight[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The words alone through the same layers (no visual tokens): the [CLS] vector (B, H)."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                visual_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, L); visual_tokens (B, N, H) already embedded.

        Returns the output sequence (B, L+N, H) and the pooled [CLS] vector (B, H).
        """
        text = self.bert.embeddings(input_ids=input_ids)  # word + position + type 0, LayerNorm
        hidden = torch.cat([text, visual_tokens.to(text.dtype)], dim=1)
        visual_mask = attention_mask.new_ones(visual_tokens.shape[:2])
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                         attention_mask=torch.cat([attention_mask, visual_mask], dim=1))
        sequence = self.bert.encoder(hidden, attention_mask=mask).last_hidden_state
        return sequence, self.bert.pooler(sequence)
