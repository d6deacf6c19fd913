"""Evaluation files on any path etils.epath accepts (local, gs://): whole-or-absent writes, .npz in and out.

Why not np.save / open / os.replace on the path: those take only local paths, and pathlib would turn
'gs://bucket/run' into the local folder './gs:/bucket/run'. A write here is whole or absent either way:
locally through a temporary file, fsync and rename (atomic on POSIX); on an object store the object
appears only when its upload completes (a killed upload leaves nothing), so it is written in place,
without the copy-and-delete that a rename costs there. Archives are built in memory (an evaluation's
files are one chunk, one statistics file or one weights file) except `open_stream`'s, which streams.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from jit_jax.checkpoint import as_path


def is_remote(path: str | os.PathLike) -> bool:
    return '://' in os.fspath(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = False) -> epath.Path:
    """Write `data` to `path` so that readers see the whole file or none; sync: fsync a local file first."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_bytes(data)
        return path
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_npz(path: str | os.PathLike, arrays: dict[str, Any], *, sync: bool = False) -> epath.Path:
    """np.savez of `arrays` to `path` (any name: a file object keeps np.savez from appending .npz)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(path, buffer.getvalue(), sync=sync)


def load_npz(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every array of an .npz at `path`, read into memory."""
    with as_path(path).open('rb') as f, np.load(f, allow_pickle=allow_pickle) as data:
        return {k: data[k] for k in data.files}


class _WriteOnly:
    """A file seen as unseekable, so zipfile streams into it (data descriptors, no seeking back)."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


@contextlib.contextmanager
def open_stream(path: str | os.PathLike) -> Iterator[Any]:
    """A binary stream for a large file at `path`, whole or absent once the block exits without error.

    Written under `<name>.tmp` and renamed at the end, locally and remotely (on GCS a server-side copy):
    an upload that completes at close would also publish a file cut short by an error in the block.
    """
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with tmp.open('wb') as f:
        yield _WriteOnly(f) if is_remote(path) else f
    tmp.rename(path)  # epath: os.rename locally (atomic), copy and delete on an object store
