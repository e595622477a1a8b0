"""Semantic visual losses (Yang, Liu & Lin 2023): detector knowledge distilled into the CNN grid.

The CNN's grid features are pooled over each offline detector box with RoIAlign and must
predict, from that pooled vector alone (linear heads, so the semantics have to be in the
grid features themselves), the box's object class, its attributes and the detector's region
feature. Training-only: the detector outputs are targets, never inputs, so inference stays
detector-free.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from soho_ds.runtime.config import SemanticConfig


def object_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over object classes, and top-1 accuracy. logits (R, C), labels (R,)."""
    loss = F.cross_entropy(logits.float(), labels)
    return loss, (logits.argmax(-1) == labels).float().mean()


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-label BCE summed over attribute classes, averaged over boxes (so the loss does not
    shrink with the vocabulary size); accuracy = share of boxes whose top attribute is a true one."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(-1).mean()
    top = logits.argmax(-1, keepdim=True)
    return loss, targets.gather(-1, top).float().mean()


def region_feature_loss(predicted: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """smooth_l1: Huber (beta 1) per element, averaged; cosine: 1 - cosine similarity per box, averaged."""
    predicted, target = predicted.float(), target.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(predicted, target, dim=-1)).mean()
    return F.smooth_l1_loss(predicted, target, beta=1.0)


class SemanticVisualHeads(nn.Module):
    """RoIAlign over the CNN grid + three linear heads; `forward` returns the weighted loss terms."""

    def __init__(self, in_channels: int, cfg: SemanticConfig):
        super().__init__()
        self.cfg = cfg
        self.object_head = nn.Linear(in_channels, cfg.num_objects) if cfg.object_weight > 0 else None
        self.attribute_head = nn.Linear(in_channels, cfg.num_attributes) if cfg.attribute_weight > 0 else None
        self.feature_head = nn.Linear(in_channels, cfg.feature_dim) if cfg.feature_weight > 0 else None

    def pool(self, grid: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
        """grid (B, C, h, w), boxes (R, 5) [image, x0, y0, x1, y1] in input pixels -> (R, C)."""
        pooled = roi_align(grid.float(), boxes.float(), output_size=self.cfg.roi_size,
                           spatial_scale=grid.shape[-1] / image_size, sampling_ratio=2, aligned=True)
        return pooled.mean(dim=(2, 3)).to(grid.dtype)

    def forward(self, grid: torch.Tensor, batch: dict[str, torch.Tensor], image_size: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        boxes = batch["region_boxes"]
        # A batch without boxes still runs every head on one dummy row, times zero, so every
        # parameter gets a (zero) gradient, as ZeRO's gradient reduction expects.
        empty = boxes.shape[0] == 0
        if empty:
            boxes = torch.tensor([[0, 0, 0, 1, 1]], dtype=boxes.dtype, device=boxes.device)
        pooled = self.pool(grid, boxes, image_size)
        out: dict[str, torch.Tensor] = {}
        total = pooled.new_zeros((), dtype=torch.float32)
        scale = 0.0 if empty else 1.0
        if self.object_head is not None:
            logits = self.object_head(pooled)
            labels = batch["region_objects"] if not empty else logits.new_zeros(1, dtype=torch.long)
            loss, acc = object_loss(logits, labels)
            out["loss/object"], out["acc/object"] = loss * scale, acc * scale
            total = total + cfg.object_weight * out["loss/object"]
        if self.attribute_head is not None:
            logits = self.attribute_head(pooled)
            targets = batch["region_attributes"] if not empty else torch.zeros_like(logits)
            loss, acc = attribute_loss(logits, targets)
            out["loss/attribute"], out["acc/attribute"] = loss * scale, acc * scale
            total = total + cfg.attribute_weight * out["loss/attribute"]
        if self.feature_head is not None:
            predicted = self.feature_head(pooled)
            target = batch["region_features"] if not empty else torch.zeros_like(predicted)
            out["loss/region_feature"] = region_feature_loss(predicted, target, cfg.feature_loss) * scale
            total = total + cfg.feature_weight * out["loss/region_feature"]
        out["semantic/boxes_per_image"] = grid.new_tensor(0.0 if empty else boxes.shape[0] / grid.shape[0],
                                                          dtype=torch.float32)
        return total, out
