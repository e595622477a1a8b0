"""SOHO: CNN grid features -> Visual Dictionary -> visual tokens, fused with words by BERT.

`SohoModel` is the one encode path every user goes through (pretraining, each finetune,
retrieval scoring, inference): `encode_image` (once per image: CNN, neck, VD, validity mask,
position code), `fuse` (visual tokens repeated per caption, joined with the words) and
`encode_text` (words alone). Heads and losses live with their tasks.

Images arrive padded to a common size; `image_sizes` gives each one's valid height and width.
Grid cells that lie wholly in padding are invalid: the VD ignores them, MVM never picks them,
pooling skips them and the fusion transformer never attends to them.

Statistics changed outside autograd (the VD's EMA, BatchNorm running statistics) change only
when the step is good: a training forward stages them, `commit(ok)` keeps them where the
device flag `ok` holds and restores them otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from soho_ds.config import ModelConfig
from soho_ds.models.backbone import ResNetBackbone
from soho_ds.models.fusion import CrossModalEncoder
from soho_ds.models.norm import BatchNorm2d
from soho_ds.models.visual_dictionary import VisualDictionary


def valid_cells(image_sizes: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 2) valid pixel heights/widths -> (B, 2) grid cells touching the image (ceil), at most the grid."""
    cells = torch.div(image_sizes + stride - 1, stride, rounding_mode="floor")
    return torch.minimum(cells, torch.tensor(grid, device=image_sizes.device)).clamp(min=1)


def sine_position_encoding(cells: torch.Tensor, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """2-D sine/cosine position code (DETR's normalised variant): each cell centre divided by its
    image's valid extent, so the same relative place has the same code at every resolution.
    cells (B, 2) valid rows/columns, grid (h, w) -> (B, h*w, dim); half the channels for y, half for x."""
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=cells.device, dtype=torch.float32) / quarter))
    cells = cells.float()
    y = (torch.arange(h, device=cells.device, dtype=torch.float32)[None, :] + 0.5) / cells[:, :1] * 2 * math.pi
    x = (torch.arange(w, device=cells.device, dtype=torch.float32)[None, :] + 0.5) / cells[:, 1:] * 2 * math.pi
    y, x = y[..., None] * freq, x[..., None] * freq  # (B, h, q), (B, w, q)
    B = cells.shape[0]
    y_code = torch.cat([y.sin(), y.cos()], dim=-1)[:, :, None, :].expand(B, h, w, 2 * quarter)
    x_code = torch.cat([x.sin(), x.cos()], dim=-1)[:, None, :, :].expand(B, h, w, 2 * quarter)
    code = torch.cat([y_code, x_code], dim=-1).reshape(B, h * w, 4 * quarter)
    return nn.functional.pad(code, (0, dim - 4 * quarter))


@dataclass
class VisualTokens:
    """One batch of encoded images. B images, N = h*w cells, H hidden, C CNN channels."""
    features: torch.Tensor  # (B, C, h, w) CNN grid (the semantic heads pool it)
    tokens: torch.Tensor  # (B, N, H) neck output, before position and type codes
    vd_index: torch.Tensor | None  # (B, N) nearest dictionary entry, None without the VD
    valid: torch.Tensor  # (B, N) bool: the cell lies at least partly inside its image
    position: torch.Tensor  # (B, N, H) position code
    grid: tuple[int, int]  # (h, w)


class VisualEmbedding(nn.Module):
    """Neck: 1x1 conv + BN to the transformer width, the VD, a learned gate between the VD entry
    and the raw feature (model.gate), a Linear; then position code, visual token type and LayerNorm."""

    def __init__(self, in_channels: int, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.proj = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), BatchNorm2d(hidden))
        self.vd = VisualDictionary(cfg.vd_size, hidden, cfg.vd_momentum, init_from_data=cfg.vd_init_from_data,
                                   restart_below=cfg.vd_restart_below, variant=cfg.vd_variant) if cfg.use_vd else None
        self.gate_kind = cfg.gate
        if not cfg.use_vd:
            self.gate = None
        elif cfg.gate == "official":  # SOHO's: a 1x1 conv + BatchNorm over [Linear(q), x]
            self.gate_query = nn.Linear(hidden, hidden)
            self.gate = nn.Sequential(nn.Conv2d(2 * hidden, 2, 1), BatchNorm2d(2))
        else:
            self.gate = nn.Linear(2 * hidden, 2)
        self.out = nn.Linear(hidden, hidden)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))  # replaces MVM-masked tokens
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def quantise(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, C, h, w), valid (B, N) -> tokens (B, N, H), VD indices (B, N) or None."""
        x = self.proj(features).flatten(2).transpose(1, 2)  # (B, N, H)
        if self.vd is None:
            return self.out(x), None
        q, index = self.vd(x, valid)
        if self.gate_kind == "official":
            B, _, h, w = features.shape
            grid = torch.cat([self.gate_query(q), x], dim=-1).transpose(1, 2).reshape(B, -1, h, w)
            weights = self.gate(grid).flatten(2).transpose(1, 2).softmax(-1)  # (B, N, 2)
        else:
            weights = self.gate(torch.cat([x, q], dim=-1)).softmax(-1)  # (B, N, 2)
        mixed = weights[..., :1] * q + weights[..., 1:] * x
        return self.out(mixed), index

    def embed(self, tokens: torch.Tensor, position: torch.Tensor, type_embedding: torch.Tensor,
              mvm_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Adds position and type codes; `mvm_mask` (T, N) marks tokens to replace by the mask embedding."""
        if mvm_mask is not None:
            tokens = torch.where(mvm_mask[..., None], self.mask_embedding.to(tokens.dtype), tokens)
        return self.dropout(self.norm(tokens + position.to(tokens.dtype) + type_embedding.to(tokens.dtype)))


class UncommittedStatistics(RuntimeError):
    """A training forward began while the previous one's statistics were still waiting for `commit`."""


class SohoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(name=cfg.backbone, weights_path=cfg.backbone_weights,
                                       freeze_stem=cfg.freeze_stem, pool_last=cfg.pool_last,
                                       grad_checkpointing=cfg.grad_checkpointing, norm=cfg.backbone_norm)
        self.fusion = CrossModalEncoder(cfg)
        self.visual = VisualEmbedding(self.backbone.out_channels, cfg)
        self._staged: tuple[list, torch.Tensor] | None = None  # BatchNorm statistics before this step
        # training forwards whose statistics were held back (non-finite inputs or loss), on the device
        self.register_buffer("held_back", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def stride(self) -> int:
        return self.backbone.stride

    @property
    def grid_channels(self) -> int:
        return self.backbone.out_channels

    @property
    def bert_config(self):
        return self.fusion.config

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.fusion.word_embeddings

    @property
    def visual_dictionary(self) -> VisualDictionary | None:
        return self.visual.vd

    def _running_statistics(self) -> list[torch.Tensor]:
        return [b for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    def encode_image(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisualTokens:
        """images (B, 3, H, W), padded; image_sizes (B, 2) valid (height, width) in pixels, None: all valid."""
        if self.training:
            if self._staged is not None:
                raise UncommittedStatistics("SohoModel.encode_image: the previous training forward's BatchNorm and "
                                            "Visual Dictionary statistics were never committed; end every training "
                                            "forward with commit(loss) (the trainer does) or switch to eval()")
            saved = [(b, b.clone()) for b in self._running_statistics()]
        features = self.backbone(images)  # (B, C, h, w), once per image
        grid = tuple(features.shape[-2:])
        B = images.shape[0]
        if image_sizes is None:
            cells = torch.tensor(grid, device=images.device).expand(B, 2)
        else:
            cells = valid_cells(image_sizes.to(images.device), self.stride, grid)
        rows = torch.arange(grid[0], device=images.device)[None, :, None] < cells[:, 0, None, None]
        cols = torch.arange(grid[1], device=images.device)[None, None, :] < cells[:, 1, None, None]
        valid = (rows & cols).reshape(B, -1)
        tokens, vd_index = self.visual.quantise(features, valid)
        if self.training:
            self._staged = (saved, torch.isfinite(images).all() & torch.isfinite(features).all())
        position = sine_position_encoding(cells, grid, self.hidden_size)
        return VisualTokens(features, tokens, vd_index, valid, position, grid)

    def embed_visual(self, visual: VisualTokens, image_index: torch.Tensor | None = None,
                     mvm_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens ready for fusion, one row per caption: `image_index` (T,) maps each caption to
        its image (None: one caption per image); `mvm_mask` (T, N) marks tokens to hide.
        -> tokens (T, N, H), valid (T, N)."""
        tokens, position, valid = visual.tokens, visual.position, visual.valid
        if image_index is not None:
            tokens, position, valid = (t.index_select(0, image_index) for t in (tokens, position, valid))
        return self.visual.embed(tokens, position, self.fusion.visual_type_embedding, mvm_mask), valid

    def fuse(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualTokens,
             image_index: torch.Tensor | None = None, mvm_mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joins captions (T, L) with their images' tokens -> sequence (T, L+N, H), pooled [CLS] (T, H).
        Each image's tokens are computed once and shared by its captions."""
        tokens, valid = self.embed_visual(visual, image_index, mvm_mask)
        return self.fusion(input_ids, attention_mask, tokens, valid)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The words alone through the fusion layers: the [CLS] vector (T, H)."""
        return self.fusion.encode_text(input_ids, attention_mask)

    def commit(self, loss: torch.Tensor) -> torch.Tensor:
        """Ends a training forward, once, before its backward: the statistics its `encode_image` changed
        (VD EMA, BatchNorm running statistics) stay only if the step is good (finite inputs and loss) and
        are restored otherwise. Returns the loss to back-propagate: NaN after non-finite inputs, so that
        the gradients are NaN too and the optimizer skips the step (a NaN pixel need not reach the loss
        by itself). The next training forward refuses to run until this is called."""
        if self._staged is None:
            raise UncommittedStatistics("SohoModel.commit: no training forward to commit (commit once after each)")
        with torch.no_grad():
            saved, inputs_ok = self._staged
            self._staged = None
            keep = inputs_ok & torch.isfinite(loss)
            if self.visual.vd is not None:
                self.visual.vd.commit(keep)
            self.held_back += (~keep).long()
            for buffer, before in saved:
                # .data: autograd saved BatchNorm's running statistics as inputs of this step's graph; they
                # play no part in its training-mode backward, so changing them is safe, but must not be seen
                buffer.data.copy_(torch.where(keep, buffer, before))
        return loss * torch.where(keep, 1.0, float("nan")).to(loss.dtype)


def count_parameters(module: nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"
