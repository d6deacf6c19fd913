"""Image folder -> ArrayRecord shards (converted once), and the Grain source that reads them back.

Why convert at all: decoding full-size JPEGs and resizing them every epoch is what made the PyTorch
pipeline CPU-bound (12 workers per GPU). JiT's only crop is deterministic (ADM centre crop), so it is
done once here; training then decodes a small PNG and flips. ArrayRecord with group_size:1 gives cheap
random access, which Grain needs for a global shuffle and for checkpointable iterator state, and it
needs no TensorFlow.

Layout written to --out:
    train-00000-of-00004.array_record ...   records: msgpack {'image': PNG bytes, 'label': int}
    dataset_info.json                       class names, counts, image_size, shard files (written last,
                                            so a half-finished conversion is never read)

    python -m jit_jax.data.imagefolder --src ROOT --out DIR --image-size 256 [--num-shards N]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Callable, Iterable

import msgpack
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
INFO_FILE = 'dataset_info.json'
FORMAT = 'jit_jax.imagefolder/v1'


class BadImageError(ValueError):
    """An input image that Pillow cannot decode; the message names the file."""


def adm_center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (the only crop JiT uses): uint8[image_size, image_size, c].

    BOX-halving first (while the short side is still >= 2x the target) is a cheap antialiasing
    filter; the final BICUBIC step then only rescales by < 2x. Rounding follows Python's round(),
    as the reference does, so sizes match it exactly.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def load_and_crop(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decodes any Pillow-readable file as RGB (grayscale, palette, RGBA, CMYK all become RGB, as
    torchvision's ImageFolder loader does) and centre-crops it: uint8[image_size, image_size, 3]."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not later
            rgb = image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f'cannot decode image {path}: {type(e).__name__}: {e}') from e
    return adm_center_crop(rgb, image_size)


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


def list_image_folder(src: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names -> label ids 0..n-1) and (path, label) for every image."""
    root = pathlib.Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {root} does not exist or is not a directory (--src)')
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not class_dirs:
        raise ValueError(f'image folder {root} has no class subfolders; expected {root}/<class>/*.jpg')
    files = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f'class folder {class_dir} has no {"/".join(IMAGE_EXTENSIONS)} images')
        files.extend((str(p), label) for p in images)
    return [p.name for p in class_dirs], files


def _convert_one(job: tuple[str, int, int]) -> tuple[bytes | None, str]:
    """Worker body: (record, '') or (None, error message). Errors are returned, not raised, so the
    parent decides between failing and --skip-bad."""
    path, label, image_size = job
    try:
        return encode_record(load_and_crop(path, image_size), label), ''
    except BadImageError as e:
        return None, str(e)


def _progress_printer(total: int, log: Callable[[str], None]) -> Callable[[int], None]:
    start = time.monotonic()
    last = [start]

    def report(done: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 5.0:
            last[0] = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            log(f'converted {done}/{total} images ({rate:.0f} img/s, eta {eta / 60:.1f} min)')
    return report


def convert(src: str | os.PathLike, out: str | os.PathLike, image_size: int = 256, *,
            num_shards: int | None = None, skip_bad: bool = False, num_workers: int = 1,
            overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Converts `src/<class>/*.{jpg,jpeg,png}` into ArrayRecord shards under `out`; returns the info.

    Shards hold contiguous runs of the (class, file name)-sorted list; training order comes from
    Grain's global shuffle, so nothing is shuffled here. Default shard count: ~10k records each.
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # only the converter needs it

    if image_size < 1:
        raise ValueError(f'image_size must be positive, got {image_size} (--image-size)')
    out_dir = pathlib.Path(out)
    if (out_dir / INFO_FILE).exists() and not overwrite:
        raise FileExistsError(f'{out_dir / INFO_FILE} exists: {out_dir} was already converted '
                              '(pass --overwrite to redo it)')
    class_names, files = list_image_folder(src)
    num_shards = num_shards or max(1, len(files) // 10_000)
    num_shards = max(1, min(num_shards, len(files)))
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f'{src}: {len(files)} images in {len(class_names)} classes -> {num_shards} shards in {out_dir}')

    jobs = [(path, label, image_size) for path, label in files]
    bounds = np.linspace(0, len(files), num_shards + 1).round().astype(int)
    counts = [0] * len(class_names)
    shards, skipped = [], []
    report = _progress_printer(len(files), log)
    # spawn, not fork: forking a process that has imported JAX (multithreaded) can deadlock.
    pool = multiprocessing.get_context('spawn').Pool(num_workers) if num_workers > 1 else None
    try:
        results: Iterable = (pool.imap(_convert_one, jobs, chunksize=16) if pool
                             else map(_convert_one, jobs))
        for k in range(num_shards):
            name = f'train-{k:05d}-of-{num_shards:05d}.array_record'
            writer = ArrayRecordWriter(str(out_dir / name), 'group_size:1')
            written = 0
            for j in range(bounds[k], bounds[k + 1]):
                record, error = next(results)
                if record is None:
                    if not skip_bad:
                        raise BadImageError(f'{error} (pass --skip-bad to skip unreadable images)')
                    log(f'warning: skipping {error}')
                    skipped.append(files[j][0])
                    continue
                writer.write(record)
                counts[files[j][1]] += 1
                written += 1
                report(j + 1)
            writer.close()
            if written:
                shards.append({'file': name, 'num_records': written})
            else:
                (out_dir / name).unlink()
    finally:
        if pool:
            pool.terminate()

    for name, count in zip(class_names, counts):
        if count == 0:
            raise ValueError(f'class {name!r} has no readable images left after skipping bad files')
    info = {'format': FORMAT, 'source': str(src), 'image_size': image_size,
            'num_classes': len(class_names), 'class_names': class_names, 'class_counts': counts,
            'num_examples': sum(counts), 'shards': shards, 'skipped': skipped}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1))
    log(f'wrote {info["num_examples"]} records ({len(skipped)} skipped) and {out_dir / INFO_FILE}')
    return info


def read_info(data_dir: str | os.PathLike) -> dict:
    """The dataset_info.json of a converted folder, with an error that says how to make one."""
    path = pathlib.Path(data_dir) / INFO_FILE
    if not path.exists():
        where = ('does not exist' if not pathlib.Path(data_dir).is_dir()
                 else f'has no {INFO_FILE} (not converted, or the conversion did not finish)')
        raise FileNotFoundError(
            f'data directory {data_dir} (config.data.data_dir) {where}; create it with '
            f'`python -m jit_jax.data.imagefolder --src IMAGE_FOLDER --out {data_dir}`')
    info = json.loads(path.read_text())
    if info.get('format') != FORMAT:
        raise ValueError(f'{path}: format {info.get("format")!r}, expected {FORMAT!r}')
    return info


class ArrayRecordImages:
    """Random-access source of {'image': uint8[s, s, 3], 'label': int32} over converted shards."""

    def __init__(self, data_dir: str | os.PathLike, image_size: int | None = None):
        import grain  # deferred: the converter CLI does not need Grain

        self.data_dir = pathlib.Path(data_dir)
        self.info = read_info(data_dir)
        self.image_size = int(image_size or self.info['image_size'])
        if self.image_size != self.info['image_size']:
            raise ValueError(f'{self.data_dir} was converted at image_size {self.info["image_size"]}, '
                             f'but config.data.image_size is {self.image_size}; convert again or '
                             'change the config')
        paths = [self.data_dir / shard['file'] for shard in self.info['shards']]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f'shard {path} listed in {INFO_FILE} is missing')
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
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
        return f'ArrayRecordImages({str(self.data_dir)!r}, image_size={self.image_size})'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m jit_jax.data.imagefolder',
        description='Convert ROOT/<class>/*.{jpg,jpeg,png} into ADM-centre-cropped PNGs in '
                    'ArrayRecord shards, for config.data.source="arrayrecord".')
    parser.add_argument('--src', required=True, help='image folder root, one subfolder per class')
    parser.add_argument('--out', required=True, help='output directory (config.data.data_dir)')
    parser.add_argument('--image-size', type=int, default=256, help='square output side (256)')
    parser.add_argument('--num-shards', type=int, default=None,
                        help='number of shard files (default: about 10k images each)')
    parser.add_argument('--num-workers', type=int, default=os.cpu_count() or 1,
                        help='decoding processes (default: all CPUs)')
    parser.add_argument('--skip-bad', action='store_true',
                        help='skip unreadable images with a warning instead of failing')
    parser.add_argument('--overwrite', action='store_true', help='redo an existing conversion')
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        convert(args.src, args.out, args.image_size, num_shards=args.num_shards,
                skip_bad=args.skip_bad, num_workers=args.num_workers, overwrite=args.overwrite,
                log=log)
    except (OSError, ValueError) as e:
        log(f'error: {e}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
