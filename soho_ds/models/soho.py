"""SOHO: CNN grid features -> Visual Dictionary -> visual tokens, fused with words by BERT.

`SohoModel` composes the parts and exposes two steps so objectives can act in between:
`image_tokens` (CNN, neck, VD: per image, computed once) and `fuse` (visual tokens repeated
per caption, joined with the words). Heads and losses live with their tasks.
"""
from __future__ import annotations

import torch
from torch import nn

from soho_ds.models.backbone import ResNetBackbone
from soho_ds.models.fusion import CrossModalEncoder, bert_config
from soho_ds.models.visual_dictionary import VisualDictionary
from soho_ds.runtime.config import ModelConfig


def sine_position_encoding(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """2-D sine/cosine position code (DETR style): half the channels for y, half for x. -> (h*w, dim)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    y = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freq  # (h, dim/4)
    x = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freq  # (w, dim/4)
    y_code = torch.cat([y.sin(), y.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    x_code = torch.cat([x.sin(), x.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    code = torch.cat([y_code, x_code], dim=-1).reshape(height * width, 4 * quarter)
    return nn.functional.pad(code, (0, dim - 4 * quarter))


class VisualEmbedding(nn.Module):
    """Neck: 1x1 conv + BN to the transformer width, the VD, a learned gate between the VD entry
    and the raw feature, a Linear, then position code, visual token type and LayerNorm."""

    def __init__(self, in_channels: int, hidden_size: int, vd_size: int, vd_momentum: float, use_vd: bool,
                 dropout: float, vd_init_from_data: bool = True, vd_restart_below: float = 0.01):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, hidden_size, 1, bias=False), nn.BatchNorm2d(hidden_size))
        self.vd = VisualDictionary(vd_size, hidden_size, vd_momentum, init_from_data=vd_init_from_data,
                                   restart_below=vd_restart_below) if use_vd else None
        self.gate = nn.Linear(2 * hidden_size, 2) if use_vd else None
        self.out = nn.Linear(hidden_size, hidden_size)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden_size))  # replaces MVM-masked tokens
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def quantise(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """features (B, C, h, w) -> tokens (B, N, H), VD indices (B, N) or None, grid (h, w)."""
        x = self.proj(features)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, H)
        if self.vd is None:
            return self.out(x), None, (h, w)
        q, index = self.vd(x)
        weights = self.gate(torch.cat([x, q], dim=-1)).softmax(-1)  # (B, N, 2)
        mixed = weights[..., :1] * q + weights[..., 1:] * x
        return self.out(mixed), index, (h, w)

    def embed(self, tokens: torch.Tensor, grid: tuple[int, int], type_embedding: torch.Tensor,
              mvm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Adds position and type codes; `mvm_mask` (B, N) marks tokens to replace by the mask embedding."""
        if mvm_mask is not None:
            tokens = torch.where(mvm_mask[..., None], self.mask_embedding.to(tokens.dtype), tokens)
        pos = sine_position_encoding(*grid, tokens.shape[-1], device=tokens.device).to(tokens.dtype)
        return self.dropout(self.norm(tokens + pos + type_embedding.to(tokens.dtype)))


class SohoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.backbone, cfg.backbone_weights, cfg.freeze_stem, cfg.pool_last,
                                       cfg.grad_checkpointing)
        config = None if cfg.bert_dir else bert_config(cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                                       cfg.intermediate_size, cfg.dropout, cfg.vocab_size,
                                                       cfg.max_position)
        self.fusion = CrossModalEncoder(config, cfg.bert_dir, cfg.grad_checkpointing, cfg.num_layers)
        hidden = self.fusion.config.hidden_size
        if cfg.bert_dir and hidden != cfg.hidden_size:
            raise ValueError(f"{cfg.bert_dir}: hidden size {hidden}, but model.hidden_size is {cfg.hidden_size}")
        self.visual = VisualEmbedding(self.backbone.out_channels, hidden, cfg.vd_size, cfg.vd_momentum, cfg.use_vd,
                                      cfg.dropout, cfg.vd_init_from_data, cfg.vd_restart_below)

    @property
    def hidden_size(self) -> int:
        return self.fusion.config.hidden_size

    @property
    def visual_dictionary(self) -> VisualDictionary | None:
        return self.visual.vd

    def image_tokens(self, images: torch.Tensor):
        """images (B, 3, H, W) -> tokens (B, N, H) before position coding, VD indices (B, N), grid."""
        return self.visual.quantise(self.backbone(images))

    def fuse(self, input_ids, attention_mask, tokens, grid, image_index=None, mvm_mask=None):
        """Joins captions with their images' tokens. `image_index` (T,) maps each caption to its image,
        so each image's tokens are computed once and shared by its captions."""
        visual = self.visual.embed(tokens, grid, self.fusion.visual_type_embedding, mvm_mask)
        if image_index is not None:
            visual = visual.index_select(0, image_index)
        return self.fusion(input_ids, attention_mask, visual)


def count_parameters(module: nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"
