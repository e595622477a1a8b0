"""Pictures for TensorBoard: a training image, its caption, and the Visual Dictionary entry of
every grid cell drawn over it (cells that share an entry share a colour)."""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from soho_ds.data.pipeline import MEAN, STD

_PALETTE = np.random.default_rng(0).integers(40, 256, size=(4096, 3), dtype=np.uint8)


def draw_vd_picture(image: torch.Tensor, size: list[int], vd_index: torch.Tensor | None, grid: tuple[int, int],
                    caption: str) -> np.ndarray:
    """image (3, H, W) normalised and padded, size its valid (h, w), vd_index (N,) -> (H', W', 3) uint8:
    the image, the image with the index map over it, and the caption below."""
    h, w = size
    pixels = (image[:, :h, :w].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)).clip(0, 255)
    photo = Image.fromarray(pixels.astype(np.uint8))
    panels = [photo]
    if vd_index is not None:
        gh, gw = grid
        cells = _PALETTE[vd_index.numpy().reshape(gh, gw) % len(_PALETTE)]
        stride_y, stride_x = image.shape[1] // gh, image.shape[2] // gw
        overlay = np.kron(cells, np.ones((stride_y, stride_x, 1), dtype=np.uint8))[:h, :w]
        mixed = Image.blend(photo, Image.fromarray(overlay), 0.45)
        draw = ImageDraw.Draw(mixed)
        for y in range(0, h, stride_y):
            draw.line([(0, y), (w, y)], fill=(255, 255, 255))
        for x in range(0, w, stride_x):
            draw.line([(x, 0), (x, h)], fill=(255, 255, 255))
        for r in range(min(gh, -(-h // stride_y))):
            for c in range(min(gw, -(-w // stride_x))):
                draw.text((c * stride_x + 2, r * stride_y + 1), str(int(vd_index[r * gw + c])), fill=(255, 255, 255))
        panels.append(mixed)
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    lines = textwrap.wrap(caption, max(8, width // 6))[:3]
    canvas = Image.new("RGB", (width, h + 4 + 13 * len(lines)), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    for i, line in enumerate(lines):
        ImageDraw.Draw(canvas).text((2, h + 3 + 13 * i), line, fill=(0, 0, 0))
    return np.asarray(canvas)
