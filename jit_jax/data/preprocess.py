"""The official JiT / ADM preprocessing: a deterministic centre crop, then (in the pipeline) a random flip.

JiT trains on `center_crop_arr` from ADM (guided-diffusion): shrink by exact halvings with a BOX
filter while the short side is still >= 2x the target (cheap antialiasing), resize the short side to
the target with BICUBIC, then crop the centre square. The crop is deterministic, so prepared
ArrayRecord data stores it once; TFDS data (original JPEGs) is cropped on every read. The only random
augmentation is a horizontal flip with probability 1/2 (jit_jax.data.pipeline).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


class BadImageError(ValueError):
    """An input image that Pillow cannot decode; the message names the file."""


def adm_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: uint8[image_size, image_size, c].

    BOX-halving first leaves the final BICUBIC step a rescale by < 2x. Rounding follows Python's
    round(), as the reference does, so sizes match it exactly.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def array_to_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """A decoded uint8[H, W] / [H, W, 1] / [H, W, 3] array of any size -> uint8[s, s, 3] crop."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return adm_center_crop(Image.fromarray(image).convert('RGB'), image_size)


def load_and_crop(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decodes a Pillow-readable file (local path or any etils.epath path) as RGB and crops it.

    Grayscale, palette, RGBA and CMYK all become RGB, as torchvision's ImageFolder loader does.
    """
    from etils import epath  # pylint: disable=import-outside-toplevel

    try:
        with epath.Path(path).open('rb') as f, Image.open(f) as image:
            image.load()  # decode now, so truncated files fail here and not later
            rgb = image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f'cannot decode image {path}: {type(e).__name__}: {e}') from e
    return adm_center_crop(rgb, image_size)
