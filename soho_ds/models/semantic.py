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

from soho_ds.config import SemanticConfig


def object_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over object classes, and top-1 accuracy. logits (R, C), labels (R,); label -1
    (class unknown, e.g. a detector file without class ids) is left out of both."""
    valid = labels >= 0
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (ce * valid).sum() / n, ((logits.argmax(-1) == labels) & valid).sum().float() / n


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the softmax over attribute classes against the box's attributes sharing the
    probability mass equally (BUTD's attribute head is a softmax too), averaged over the boxes that have
    attributes. At initialisation it is ln(classes), 6.0 for VG's 400, the scale of the object loss's
    ln(1600) = 7.4; a BCE summed over the classes starts at 400 ln 2 = 277 and swamps every other
    term. Accuracy: share of those boxes whose top attribute is a true one."""
    targets = targets.float()
    count = targets.sum(-1)
    has = count > 0
    n = has.sum().clamp(min=1)
    ce = -(targets / count.clamp(min=1)[:, None] * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    top = logits.argmax(-1, keepdim=True)
    return (ce * has).sum() / n, (targets.gather(-1, top).squeeze(-1) * has).sum() / n


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

    def pool(self, grid: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
        """grid (B, C, h, w) of `stride` input pixels per cell, boxes (R, 5) [image, x0, y0, x1, y1] in
        input pixels -> (R, C). Boxes lie inside their image, so padding is never pooled."""
        pooled = roi_align(grid.float(), boxes.float(), output_size=self.cfg.roi_size,
                           spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
        return pooled.mean(dim=(2, 3)).to(grid.dtype)

    def forward(self, grid: torch.Tensor, batch: dict[str, torch.Tensor], stride: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        boxes = batch["region_boxes"]
        # A batch without boxes still runs every head on one dummy row, times zero, so every
        # parameter gets a (zero) gradient, as ZeRO's gradient reduction expects.
        empty = boxes.shape[0] == 0
        if empty:
            boxes = torch.tensor([[0, 0, 0, 1, 1]], dtype=boxes.dtype, device=boxes.device)
        pooled = self.pool(grid, boxes, stride)
        out: dict[str, torch.Tensor] = {}
        total = pooled.new_zeros((), dtype=torch.float32)
        scale = 0.0 if empty else 1.0
        terms = (("object", self.object_head, "region_objects", cfg.object_weight, object_loss),
                 ("attribute", self.attribute_head, "region_attributes", cfg.attribute_weight, attribute_loss),
                 ("region_feature", self.feature_head, "region_features", cfg.feature_weight,
                  lambda p, t: (region_feature_loss(p, t, cfg.feature_loss), None)))
        for name, head, key, weight, loss_fn in terms:
            if head is None:
                continue
            prediction = head(pooled)
            if not empty:
                target = batch[key]
            elif key == "region_objects":
                target = torch.zeros(1, dtype=torch.long, device=prediction.device)
            else:
                target = torch.zeros_like(prediction)
            loss, acc = loss_fn(prediction, target)
            out[f"loss/{name}"] = loss * scale
            if acc is not None:
                out[f"acc/{name}"] = acc * scale
            total = total + weight * out[f"loss/{name}"]
        out["semantic/boxes_per_image"] = grid.new_tensor(0.0 if empty else boxes.shape[0] / grid.shape[0],
                                                          dtype=torch.float32)
        return total, out
