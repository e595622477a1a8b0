"""SOHO's pretraining objectives as plain functions: tensors in, loss (and accuracy) out."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the rows whose label is not IGNORE."""
    valid = labels != IGNORE
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    correct = (logits.argmax(-1) == labels) & valid
    acc = correct.sum() / valid.sum().clamp(min=1)  # no host sync: stays on the device
    return loss, acc.float()


def sample_mvm_mask(vd_index: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked visual modelling (SOHO Sec. 3.3): in each chosen image, pick one grid cell and mask
    every cell that shares its VD index, so a whole "visual word" is hidden at once.

    vd_index (B, N) -> mask (B, N) bool; each image is chosen with probability `prob`.
    """
    B, N = vd_index.shape
    device = vd_index.device
    chosen = torch.rand(B, generator=generator, device=device) < prob
    cell = torch.randint(N, (B, 1), generator=generator, device=device)
    word = vd_index.gather(1, cell)  # (B, 1) index of the picked cell
    return (vd_index == word) & chosen[:, None]


def gather_masked(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Rows of hidden (..., H) where mask is set. With none, returns the first row and False so the
    head still runs (every parameter gets a gradient, which ZeRO's reduction expects)."""
    flat, flat_mask = hidden.reshape(-1, hidden.shape[-1]), mask.reshape(-1)
    if flat_mask.any():
        return flat[flat_mask], True
    return flat[:1], False


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
