"""Prediction heads: masked words (MLM), masked visual words (MVM), image-text matching (ITM),
and the optional contrastive projections (ITC)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform


class MLMHead(nn.Module):
    """BERT's transform + a decoder tied to the word-embedding matrix (plus its own bias)."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.word_embeddings = word_embeddings  # shared, not copied
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.word_embeddings.weight, self.bias)


class MVMHead(nn.Module):
    """Scores each visual token against the L2-normalised dictionary entries. `projected`: BERT's
    transform and a Linear first, the cosine divided by `temperature`; otherwise the raw cosine of the
    fused token (SOHO's code: no parameters, temperature 1)."""

    def __init__(self, config: BertConfig, temperature: float = 0.1, projected: bool = True):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config) if projected else nn.Identity()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size) if projected else nn.Identity()
        self.temperature = temperature if projected else 1.0

    def forward(self, hidden: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """hidden (M, H), entries (K, H) -> logits (M, K)."""
        query = F.normalize(self.proj(self.transform(hidden)).float(), dim=-1)
        return query @ F.normalize(entries.float(), dim=-1).t() / self.temperature


class ITMHead(nn.Module):
    """Binary matched / not-matched classifier on the pooled [CLS] vector. `score` and `score_all`
    are the one way image-text pairs are scored: finetuning's negatives, retrieval evaluation (finetune
    and pretraining), `load_model`'s itm and search."""

    def __init__(self, hidden_size: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2, bias=bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    def score(self, soho, visual, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              image_index: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        """(T,) ITM score of caption t with image image_index[t] of the encoded images `visual` (the t-th
        image without an index): the logit of "matched" minus "not matched", whose sigmoid is P(matched).
        At most `chunk` captions go through the fusion layers at once."""
        n = input_ids.shape[0]
        step = chunk or max(n, 1)
        out = []
        for s in range(0, n, step):
            index = None if image_index is None else image_index[s:s + step]
            _, pooled = soho.fuse(input_ids[s:s + step], attention_mask[s:s + step], visual, index)
            logits = self(pooled).float()
            out.append(logits[:, 1] - logits[:, 0])
        return torch.cat(out) if out else torch.zeros(0, device=input_ids.device)

    def score_all(self, soho, visual, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  chunk: int | None = None) -> torch.Tensor:
        """(B, T) ITM scores of every image of `visual` (B encoded once) with every caption."""
        T = input_ids.shape[0]
        return torch.stack([self.score(soho, visual, input_ids, attention_mask,
                                       torch.full((T,), r, dtype=torch.long, device=input_ids.device), chunk)
                            for r in range(len(visual.tokens))])


class ContrastiveHead(nn.Module):
    """Projects pooled visual tokens and a text-only [CLS] vector to one unit-norm space (ITC)."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.image = nn.Linear(hidden_size, dim)
        self.text = nn.Linear(hidden_size, dim)

    def embed_image(self, visual_tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """visual_tokens (B, N, H), valid (B, N) bool -> (B, dim) unit vectors of the mean valid token."""
        w = valid.to(visual_tokens.dtype)[..., None]
        pooled = (visual_tokens * w).sum(1) / w.sum(1).clamp(min=1)  # padding cells count for nothing
        return F.normalize(self.image(pooled).float(), dim=-1)

    def embed_text(self, text_cls: torch.Tensor) -> torch.Tensor:
        """text_cls (T, H) -> (T, dim) unit vectors."""
        return F.normalize(self.text(text_cls).float(), dim=-1)

    def forward(self, visual_tokens: torch.Tensor, valid: torch.Tensor, text_cls: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_image(visual_tokens, valid), self.embed_text(text_cls)


CLASSIFIER_HEADS = ("mlp", "soho")


def classifier_head(kind: str, in_features: int, hidden_size: int, out_features: int,
                    dropout: float = 0.1) -> nn.Sequential:
    """The downstream answer/label head, for a transformer of width `hidden_size` (H).
    mlp: Linear to 2H, GELU, LayerNorm, Dropout, Linear (UNITER/ViLT style);
    soho: Linear to 4H, ReLU, Dropout, Linear (SOHO's VQA head: 768 -> 3072 -> 3129, dropout 0.5)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, 2 * hidden_size), nn.GELU(), nn.LayerNorm(2 * hidden_size),
                             nn.Dropout(dropout), nn.Linear(2 * hidden_size, out_features))
    if kind == "soho":
        return nn.Sequential(nn.Linear(in_features, 4 * hidden_size), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(4 * hidden_size, out_features))
    raise ValueError(f"classifier head {kind!r} is not one of {CLASSIFIER_HEADS}")
