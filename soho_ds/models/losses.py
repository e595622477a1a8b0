"""Losses every task shares, as plain functions: tensors in, loss and accuracy out (on-device)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from soho_ds.data.text import IGNORE


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the rows whose label is not IGNORE."""
    valid = labels != IGNORE
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    correct = (logits.argmax(-1) == labels) & valid
    acc = correct.sum() / valid.sum().clamp(min=1)  # no host sync: stays on the device
    return loss, acc.float()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between unit vectors, one text per image at most: image (B, D), text (T, D),
    `text_image` (T,) the image each text describes; every other image (text) in the batch is a
    negative. Returns the mean of both directions and the text->image top-1 accuracy."""
    logits = text @ image.t() / temperature  # (T, B)
    t2i = F.cross_entropy(logits, text_image)
    i2t = F.cross_entropy(logits.t()[text_image], torch.arange(len(text_image), device=logits.device))
    acc = (logits.argmax(-1) == text_image).float().mean()
    return (t2i + i2t) / 2, acc
