"""SOHO's pretraining-only objectives as plain functions: tensors in, masks or rows out."""
from __future__ import annotations

import torch


def sample_mvm_mask(vd_index: torch.Tensor, valid: torch.Tensor | None, prob: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked visual modelling (SOHO Sec. 3.3): in each chosen row, pick one valid grid cell and mask
    every valid cell that shares its VD index, so a whole "visual word" is hidden at once.

    vd_index (U, N), valid (U, N) bool or None -> mask (U, N) bool; each row (an image, or an
    (image, caption) pair) is chosen with probability `prob`. Padding cells are never picked or masked.
    """
    U, N = vd_index.shape
    device = vd_index.device
    valid = torch.ones_like(vd_index, dtype=torch.bool) if valid is None else valid
    chosen = torch.rand(U, generator=generator, device=device) < prob
    cell = torch.multinomial(valid.float(), 1, generator=generator)  # (U, 1), uniform over valid cells
    word = vd_index.gather(1, cell)  # (U, 1) index of the picked cell
    return (vd_index == word) & valid & chosen[:, None]
