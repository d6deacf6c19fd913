"""Feature statistics (mu, sigma) of an image folder, a TFDS split, prepared ArrayRecord data or the
procedural default data: the reference side of FID.

Images stream through the extractor in batches and the statistics accumulate in float64
(`frechet.RunningStats`), so a 1.28 M-image split needs no more memory than one batch. Folder images go
in as they are (torch-fidelity's folder input: decoded to RGB, any size); dataset images get the
training crop first (ADM centre crop to `image_size`), so the statistics describe what the model learns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging

from jit_jax.fid import frechet

SOURCES = ('folder', 'tfds', 'arrayrecord', 'synthetic')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def list_images(folder: str | os.PathLike) -> list[str]:
    """Every image file below `folder` (recursively), sorted: the order is the same on every machine."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    root = epath.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {folder}: no such directory')
    files = sorted(os.fspath(p) for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f'image folder {folder} holds no {"/".join(IMAGE_EXTENSIONS)} files')
    return files


def _decode(path: str) -> np.ndarray:
    from etils import epath  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with epath.Path(path).open('rb') as f, Image.open(f) as image:
        return np.asarray(image.convert('RGB'))


def open_source(source: str, *, path: str = '', split: str = 'train', image_size: int = 256,
                num_images: int = 0, num_classes: int = 10, seed: int = 0) -> tuple[int, Callable[[int], np.ndarray]]:
    """(count, image(i) -> u8[h, w, 3]) for one of SOURCES; num_images > 0 takes the first num_images."""
    if source == 'folder':
        files = list_images(path)
        count, read = len(files), lambda i: _decode(files[i])
    elif source == 'synthetic':
        from jit_jax.data import synthetic  # pylint: disable=import-outside-toplevel

        data = synthetic.SyntheticShapes(num_examples=max(num_images, 1) if num_images else 50_000,
                                         image_size=image_size, num_classes=num_classes, seed=seed)
        count, read = len(data), lambda i: data[i]['image']
    elif source == 'arrayrecord':
        from jit_jax.data import arrayrecord  # pylint: disable=import-outside-toplevel

        data = arrayrecord.ArrayRecordImages(path, image_size)
        count, read = len(data), lambda i: data[i]['image']
    elif source == 'tfds':
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        from jit_jax.data import preprocess  # pylint: disable=import-outside-toplevel

        name, _, data_dir = path.partition('@')
        builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
        if not builder.is_prepared():
            raise FileNotFoundError(f'TFDS {name} is not built in {builder.data_dir}; build it with '
                                    f'`python -m jit_jax.data.prepare tfds --name {name} ...`')
        data = builder.as_data_source(split=split)
        count, read = len(data), lambda i: preprocess.array_to_crop(data[i]['image'], image_size)
    else:
        raise ValueError(f'--source {source!r}: expected one of {SOURCES}')
    if num_images:
        if num_images > count:
            raise ValueError(f'--num-images {num_images}: the {source} source has only {count} images')
        count = num_images
    return count, read


def batches(count: int, read: Callable[[int], np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive images stacked in batches; a change of image size starts a new batch."""
    group: list[np.ndarray] = []
    for i in range(count):
        image = read(i)
        if group and (len(group) == batch_size or image.shape != group[0].shape):
            yield np.stack(group)
            group = []
        group.append(image)
    if group:
        yield np.stack(group)


def compute_stats(extractor, images: Iterator[np.ndarray], total: int, *, every_s: float = 10.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the extractor's features over `images` batches, logging images/s and ETA."""
    stats = frechet.RunningStats()
    start = last = time.time()
    for batch in images:
        stats.add(extractor(batch))
        now = time.time()
        if now - last > every_s or stats.count == total:
            rate = stats.count / max(now - start, 1e-9)
            logging.info('reference features: %d / %d images, %.1f images/s, ETA %.0f s', stats.count, total,
                         rate, (total - stats.count) / max(rate, 1e-9))
            last = now
    return stats.result()
