"""Sample grids: many images in one uint8 picture, written as PNG (Pillow) for people to look at."""

from __future__ import annotations

import io
import os

import numpy as np
from etils import epath


def make_grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """u8[n, h, w, c] -> u8[rows*(h+pad)+pad, columns*(w+pad)+pad, c], row-major, white padding."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, scale: int = 1) -> epath.Path:
    """Write u8[h, w, c] as PNG, nearest-neighbour upscaled by `scale` so small samples stay visible.

    `path` may be local or remote (gs://...): the PNG is encoded in memory and written through epath.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(np.asarray(image, np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format='PNG')
    path.write_bytes(buffer.getvalue())
    return path
