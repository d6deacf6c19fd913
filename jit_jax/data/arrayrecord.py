"""The prepared-data format (ArrayRecord shards of centre-cropped PNGs) and its Grain source.

Why prepare at all: decoding full-size JPEGs and resizing them every epoch is what made the PyTorch
pipeline CPU-bound (12 workers per GPU). JiT's only crop is deterministic, so
`python -m jit_jax.data.prepare` does it once; training then decodes a small PNG and flips.
ArrayRecord with group_size:1 gives cheap random access, which Grain needs for a global shuffle and
for checkpointable iterator state, and it needs no TensorFlow.

Layout of a prepared folder (local or any etils.epath path such as gs://):
    train-00000-of-00004.array_record ...   records: msgpack {'image': PNG bytes, 'label': int}
    train-00000-of-00004.array_record.json  per-shard record and class counts (shard is complete)
    dataset_info.json                       class names, counts, image_size, shard files (written
                                            last, so a half-finished preparation is never read)
"""

from __future__ import annotations

import io
import json
import os

import msgpack
import numpy as np
from etils import epath
from PIL import Image

INFO_FILE = 'dataset_info.json'
FORMAT = 'jit_jax.imagefolder/v1'  # unchanged name: folders prepared before stay readable
PREPARE_HINT = 'python -m jit_jax.data.prepare'


def encode_record(image: np.ndarray, label: int) -> bytes:
    """PNG (lossless: the crop is the only change to the data) in msgpack (no pickle: safe to read)."""
    buffer = io.BytesIO()
    # Level 1: ~3x faster to write than the default and only a few % larger; decode cost is the same.
    Image.fromarray(image).save(buffer, format='PNG', compress_level=1)
    return msgpack.packb({'image': buffer.getvalue(), 'label': int(label)})


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
    """Inverse of encode_record: (uint8[h, w, 3], label)."""
    fields = msgpack.unpackb(record)
    with Image.open(io.BytesIO(fields['image'])) as image:
        return np.asarray(image.convert('RGB')), int(fields['label'])


def read_info(data_dir: str | os.PathLike) -> dict:
    """The dataset_info.json of a prepared folder, with an error that says how to make one."""
    root = epath.Path(data_dir)
    path = root / INFO_FILE
    if not path.exists():
        where = ('does not exist' if not root.is_dir()
                 else f'has no {INFO_FILE} (not prepared, or the preparation did not finish)')
        raise FileNotFoundError(
            f'data directory {data_dir} (config.data.data_dir) {where}; create it once with '
            f'`{PREPARE_HINT} imagefolder --src IMAGE_FOLDER --out {data_dir}` or '
            f'`{PREPARE_HINT} tfds --name imagenet2012 --manual-dir TARS --out {data_dir}`')
    info = json.loads(path.read_text())
    if info.get('format') != FORMAT:
        raise ValueError(f'{path}: format {info.get("format")!r}, expected {FORMAT!r}')
    return info


class ArrayRecordImages:
    """Random-access source of {'image': uint8[s, s, 3], 'label': int32} over prepared shards."""

    def __init__(self, data_dir: str | os.PathLike, image_size: int):
        import grain  # deferred: preparing data does not need Grain

        self.data_dir = epath.Path(data_dir)
        self.info = read_info(data_dir)
        self.image_size = int(image_size)
        if self.image_size != self.info['image_size']:
            raise ValueError(f'{self.data_dir} was prepared at image_size {self.info["image_size"]}, '
                             f'but config.data.image_size is {self.image_size}; prepare again or '
                             'change the config')
        paths = [self.data_dir / shard['file'] for shard in self.info['shards']]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f'shard {path} listed in {INFO_FILE} is missing')
        self._source = grain.sources.ArrayRecordDataSource([os.fspath(p) for p in paths])
        self._starts = np.cumsum([0] + [shard['num_records'] for shard in self.info['shards']])
        if len(self._source) != self._starts[-1]:
            raise ValueError(f'{self.data_dir}: shards hold {len(self._source)} records, '
                             f'{INFO_FILE} says {self._starts[-1]}')

    @property
    def num_classes(self) -> int:
        return self.info['num_classes']

    def __len__(self) -> int:
        return len(self._source)

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._starts, index, side='right')) - 1
        return (f'record {index} ({self.info["shards"][shard]["file"]}, record '
                f'{index - self._starts[shard]} in it) of {self.data_dir}')

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        try:
            image, label = decode_record(self._source[index])
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise ValueError(f'cannot decode {self._where(index)}: {e}') from e
        if image.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f'{self._where(index)} decodes to shape {image.shape}, expected '
                             f'({self.image_size}, {self.image_size}, 3)')
        return {'image': image, 'label': np.int32(label)}

    def __repr__(self) -> str:
        return f'ArrayRecordImages({os.fspath(self.data_dir)!r}, image_size={self.image_size})'
