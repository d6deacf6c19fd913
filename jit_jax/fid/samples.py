"""Where an evaluation's samples go: resumable chunk files, PNGs written off the main thread, one .npz.

A chunk file (`chunks/chunk_00012.npz`: images u8, labels, pool3 features and, when available, IS
logits) either exists whole or not at all (jit_jax.fid.storage: a renamed temporary file locally, an
upload that only appears complete on gs://), so a killed evaluation restarts at the first missing chunk.
Every path goes through etils.epath: DIR may be local or gs://. PNG encoding (the costliest host work) runs in a thread
pool while the devices sample the next chunk; `SampleWriter.wait` bounds the queue so host memory
stays a few chunks. The final `samples.npz` is streamed chunk by chunk into one zip member, so 50k
256 px images (9.8 GB) never sit in memory at once.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import zipfile

import numpy as np
from etils import epath

from jit_jax.fid import storage


def chunk_path(directory: str | os.PathLike, index: int) -> epath.Path:
    return storage.as_path(directory) / 'chunks' / f'chunk_{index:05d}.npz'


def save_chunk(directory: str | os.PathLike, index: int, arrays: dict[str, np.ndarray]) -> epath.Path:
    return storage.save_npz(chunk_path(directory, index), arrays, sync=True)  # whole or absent


def load_chunk(directory: str | os.PathLike, index: int) -> dict[str, np.ndarray] | None:
    path = chunk_path(directory, index)
    return storage.load_npz(path) if path.is_file() else None


def _write_pngs(folder: epath.Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    for i, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format='PNG')
        storage.write_bytes(folder / f'{start + i:06d}_class{int(label):04d}.png', buffer.getvalue())


class SampleWriter:
    """Writes chunk files and PNGs in background threads; errors surface at the next wait()."""

    def __init__(self, directory: str | os.PathLike, png: bool, threads: int = 4, max_pending: int = 8):
        self.directory, self.png, self.max_pending = storage.as_path(directory), png, max_pending
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._pending: list[concurrent.futures.Future] = []
        if png:
            (self.directory / 'images').mkdir(parents=True, exist_ok=True)

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


def write_npz(path: str | os.PathLike, chunks, total: int, shape: tuple[int, ...]) -> epath.Path:
    """samples.npz with images u8[total, *shape] and labels i32[total], streamed from (images, labels) chunks."""
    path = storage.as_path(path)
    labels = []
    with storage.open_stream(path) as stream, zipfile.ZipFile(stream, 'w', allowZip64=True) as archive:
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
    return path
