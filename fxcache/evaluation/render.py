"""Images of samples for people to look at: tiled grids and the side-by-side PNG that
``fxcache demo`` writes (PIL only, no matplotlib)."""

from __future__ import annotations

import math
import os
from typing import Sequence

__all__ = ["IMAGE_EXTENSIONS", "grid", "image_extensions", "save_side_by_side"]

#: The file types :func:`save_side_by_side` writes, by extension (lossless first).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")


def image_extensions() -> tuple[str, ...]:
    """The extensions of :data:`IMAGE_EXTENSIONS` that this installation of PIL can write."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    return tuple(ext for ext in IMAGE_EXTENSIONS if ext in writable)


def grid(images, cols: int, scale: int, pad: int):
    """uint8 PIL image of ``images`` (N, C, H, W) in [-1, 1] tiled ``cols`` per row,
    each pixel repeated ``scale`` times, ``pad`` white pixels between tiles."""
    import numpy as np
    import torch
    from PIL import Image

    x = images.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(dtype=torch.uint8).numpy()
    n, c, h, w = x.shape
    rows = math.ceil(n / cols)
    H, W = rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad
    canvas = np.full((H, W, 3), 255, np.uint8)
    for i in range(n):
        img = x[i].transpose(1, 2, 0)
        img = np.repeat(img, 3, axis=2) if c == 1 else img[..., :3]
        img = img.repeat(scale, 0).repeat(scale, 1)
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        canvas[y0 : y0 + h * scale, x0 : x0 + w * scale] = img
    return Image.fromarray(canvas)


def save_side_by_side(path: str, panels, titles: Sequence[str], footer: str = "") -> None:
    """Image grids (each (N, C, H, W) in [-1, 1]) side by side, a title of up to two
    lines above each and a footer line below, written to ``path`` (its extension picks
    the format: one of :func:`image_extensions`)."""
    from PIL import Image, ImageDraw

    cols = max(1, math.ceil(math.sqrt(panels[0].shape[0])))
    grids = [grid(p, cols, 4, 4) for p in panels]
    gap, top, bottom = 16, 34, 22 if footer else 6
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, top + max(g.height for g in grids) + bottom), "white")
    draw = ImageDraw.Draw(out)
    x0 = 0
    for g, title in zip(grids, titles):
        out.paste(g, (x0, top))
        for j, line in enumerate(title.split("\n")[:2]):
            draw.text((x0 + 4, 3 + 14 * j), line, fill="black")
        x0 += g.width + gap
    if footer:
        draw.text((4, out.height - bottom + 5), footer, fill="black")
    from ..artefacts.store import atomic_path

    fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower())
    with atomic_path(path) as tmp:  # a failed write leaves the previous image
        out.save(tmp, format=fmt)
