"""Losses every task shares, as plain functions: tensors in, loss and accuracy out (on-device)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from soho_ds.data.text import IGNORE


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the rows whose label is not IGNORE; both 0 where there is none
    (the head still gets its zero gradient). Computed on the device: no host sync."""
    valid = labels != IGNORE
    n = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum") / n
    correct = (logits.argmax(-1) == labels) & valid
    return loss, (correct.sum() / n).float()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between unit vectors: image (B, D), text (B, D) the i-th image's text, where
    `has_text` (B,) bool says it has one. Every other image (text) in the batch is a negative;
    images without a text are negatives for the texts but ask nothing themselves. Returns the mean of
    both directions and the text->image top-1 accuracy; fixed shapes, no host sync."""
    logits = text @ image.t() / temperature  # (B texts, B images)
    target = torch.where(has_text, torch.arange(len(has_text), device=logits.device), IGNORE)
    t2i, t2i_acc = classification_loss(logits, target)
    # image -> text: the placeholder texts of images without one are no candidates
    i2t, _ = classification_loss(logits.t().masked_fill(~has_text[None, :], float("-inf")), target)
    return (t2i + i2t) / 2, t2i_acc
