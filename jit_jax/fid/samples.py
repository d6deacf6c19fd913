"""Where an evaluation's samples go: resumable chunk files, PNGs written off the main thread, one .npz.

A chunk file (`chunks/chunk_00012.npz`: images u8, labels, pool3 features and, when available, IS
logits) is written to a temporary name and renamed, so it either exists whole or not at all: a killed
evaluation restarts at the first missing chunk. PNG encoding (the costliest host work) runs in a thread
pool while the devices sample the next chunk; `SampleWriter.wait` bounds the queue so host memory
stays a few chunks. The final `samples.npz` is streamed chunk by chunk into one zip member, so 50k
256 px images (9.8 GB) never sit in memory at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import zipfile

import numpy as np


def chunk_path(directory: pathlib.Path, index: int) -> pathlib.Path:
    return directory / 'chunks' / f'chunk_{index:05d}.npz'


def save_chunk(directory: pathlib.Path, index: int, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    path = chunk_path(directory, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'wb') as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a chunk file is complete or absent
    return path


def load_chunk(directory: pathlib.Path, index: int) -> dict[str, np.ndarray] | None:
    path = chunk_path(directory, index)
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _write_pngs(folder: pathlib.Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / f'{start + i:06d}_class{int(label):04d}.png'
        tmp = path.with_suffix('.tmp.png')
        Image.fromarray(image).save(tmp)
        os.replace(tmp, path)


class SampleWriter:
    """Writes chunk files and PNGs in background threads; errors surface at the next wait()."""

    def __init__(self, directory: pathlib.Path, png: bool, threads: int = 4, max_pending: int = 8):
        self.directory, self.png, self.max_pending = directory, png, max_pending
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, index: int, start: int, arrays: dict[str, np.ndarray], *, pngs_per_task: int = 64) -> None:
        self._pending.append(self._pool.submit(save_chunk, self.directory, index, arrays))
        if self.png:
            images, labels = arrays['images'], arrays['labels']
            for lo in range(0, len(images), pngs_per_task):
                self._pending.append(self._pool.submit(_write_pngs, self.directory / 'images', start + lo,
                                                       images[lo:lo + pngs_per_task], labels[lo:lo + pngs_per_task]))
        self.wait(self.max_pending)

    def wait(self, limit: int = 0) -> None:
        while len(self._pending) > limit:
            self._pending.pop(0).result()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


def write_npz(path: pathlib.Path, chunks, total: int, shape: tuple[int, ...]) -> pathlib.Path:
    """samples.npz with images u8[total, *shape] and labels i32[total], streamed from (images, labels) chunks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp')
    labels = []
    with zipfile.ZipFile(tmp, 'w', allowZip64=True) as archive:
        with archive.open('images.npy', 'w', force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False,
                                                     'shape': (total, *shape)})
            written = 0
            for images, chunk_labels in chunks:
                f.write(np.ascontiguousarray(images, np.uint8).tobytes())
                labels.append(np.asarray(chunk_labels, np.int32))
                written += len(images)
        if written != total:
            raise ValueError(f'{path}: {written} images streamed, expected {total}')
        with archive.open('labels.npy', 'w') as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    os.replace(tmp, path)
    return path
