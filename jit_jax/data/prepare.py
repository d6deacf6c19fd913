"""Prepare training data once, outside training: image folder or TFDS dataset -> ArrayRecord shards.

    python -m jit_jax.data.prepare imagefolder --src ROOT --out DIR [--image-size 256]
    python -m jit_jax.data.prepare tfds --name imagenet2012 --manual-dir TARS --tfds-data-dir TFDS \\
        [--out DIR --image-size 256]
    common: [--num-shards N] [--workers W] [--num-processes P --process-index I] [--skip-bad]

`imagefolder` reads ROOT/<class>/*.{jpg,jpeg,png} (sorted subfolder names are the labels 0..n-1).
`tfds` first builds the TFDS dataset in TFDS's own ArrayRecord format if it is not built yet (for
imagenet2012 from ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in --manual-dir; one process,
hours for ImageNet), which training can read as config.data.source='tfds'; with --out it then
converts the split into centre-cropped shards for config.data.source='arrayrecord' (decoding a
small PNG per example instead of a full JPEG plus resize).

The conversion splits the sorted example list into --num-shards contiguous shards. Process I of P
writes shards I, I+P, I+2P, ... (run one command per machine, or use --workers for decoding
processes on one machine). Each shard is written locally, moved or uploaded (etils.epath) into --out,
then marked complete by a small `<shard>.json`; a rerun skips complete shards and rewrites any other.
The process that completes the last shard writes dataset_info.json, the file training looks for.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath

from jit_jax.data import arrayrecord, preprocess

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
Log = Callable[[str], None]


def list_image_folder(src: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolder names -> label ids 0..n-1) and (path, label) for every image."""
    root = epath.Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {src} does not exist or is not a directory (--src)')
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')),
                        key=lambda p: p.name)
    if not class_dirs:
        raise ValueError(f'image folder {src} has no class subfolders; expected {src}/<class>/*.jpg')
    files = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(os.fspath(p) for p in class_dir.iterdir()
                        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        if not images:
            raise ValueError(f'class folder {class_dir} has no {"/".join(IMAGE_EXTENSIONS)} images')
        files.extend((p, label) for p in images)
    return [p.name for p in class_dirs], files


def tfds_builder(name: str, data_dir: str, manual_dir: str, *, process_count: int, log: Log) -> Any:
    """The TFDS builder of `name` in ArrayRecord format, built from manual_dir if not built yet."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy, tfds only)

    builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
    if builder.is_prepared():
        return builder
    if not manual_dir:
        raise FileNotFoundError(f'TFDS dataset {name} is not built in {builder.data_dir}; pass '
                                '--manual-dir, the folder with the manually downloaded archives')
    if process_count > 1:
        raise RuntimeError(f'TFDS dataset {name} is not built in {builder.data_dir}; TFDS builds it in '
                           'one process: run this command once with --num-processes=1 first')
    if importlib.util.find_spec('tensorflow') is None:
        raise ImportError(f'building TFDS {name} needs TensorFlow, which is not installed: '
                          "pip install 'jit_jax[tf]' (or prepare from an image folder, which needs no TensorFlow)")
    log(f'building TFDS {name} from {manual_dir} into {builder.data_dir} (TFDS progress follows)')
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False))
    return builder


class _FolderReader:
    """Example j of an image folder listing, cropped."""

    def __init__(self, files: list[tuple[str, int]], image_size: int):
        self.files, self.image_size = files, image_size

    def __call__(self, j: int) -> tuple[np.ndarray, int]:
        path, label = self.files[j]
        return preprocess.load_and_crop(path, self.image_size), label

    def name(self, j: int) -> str:
        return self.files[j][0]


class _TfdsReader:
    """Example j of a built TFDS split, cropped; opens the data source lazily in each process."""

    def __init__(self, name: str, data_dir: str, split: str, image_size: int):
        self.args, self.image_size, self._source = (name, data_dir, split), image_size, None

    def __getstate__(self):
        return {**self.__dict__, '_source': None}

    def __call__(self, j: int) -> tuple[np.ndarray, int]:
        if self._source is None:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

            name, data_dir, split = self.args
            self._source = tfds.builder(name, data_dir=data_dir or None,
                                        file_format='array_record').as_data_source(split=split)
        example = self._source[j]
        try:
            return preprocess.array_to_crop(example['image'], self.image_size), int(example['label'])
        except (OSError, ValueError) as e:
            raise preprocess.BadImageError(f'cannot crop example {j} of TFDS {self.args}: {e}') from e

    def name(self, j: int) -> str:
        return f'TFDS {self.args[0]}/{self.args[2]} example {j}'


_READER: Any = None


def _init_worker(reader) -> None:
    global _READER  # pylint: disable=global-statement  (one reader per worker process)
    _READER = reader


def _encode(j: int) -> tuple[bytes | None, int, str]:
    """(record, label, '') or (None, -1, error). Errors are returned so the parent decides."""
    try:
        image, label = _READER(j)
        return arrayrecord.encode_record(image, label), label, ''
    except preprocess.BadImageError as e:
        return None, -1, str(e)


class Progress:
    """Images/s and ETA of this process's remaining work, printed at most every `every` seconds."""

    def __init__(self, total: int, log: Log, every: float = 5.0):
        self.total, self.log, self.every = total, log, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self, shard: str) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done == self.total or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f'prepared {self.done}/{self.total} images ({rate:.0f} img/s, '
                     f'eta {eta / 60:.1f} min) [{shard}]')


def shard_name(k: int, num_shards: int) -> str:
    return f'train-{k:05d}-of-{num_shards:05d}.array_record'


def _write_shard(out: epath.Path, name: str, jobs: range, results, skip_bad: bool, reader,
                 num_classes: int, progress: Progress, log: Log) -> dict:
    """Writes one shard (locally, then moved / uploaded into out) and returns its marker."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    counts, skipped = [0] * num_classes, []
    with tempfile.TemporaryDirectory(prefix='jit_jax_prepare_') as tmp:
        local = os.path.join(tmp, name)
        writer = ArrayRecordWriter(local, 'group_size:1')
        for j in jobs:
            record, label, error = next(results)
            if record is None:
                if not skip_bad:
                    writer.close()
                    raise preprocess.BadImageError(f'{error} (pass --skip-bad to skip unreadable images)')
                log(f'warning: skipping {error}')
                skipped.append(reader.name(j))
            else:
                writer.write(record)
                counts[label] += 1
            progress.step(name)
        writer.close()
        epath.Path(local).copy(out / name, overwrite=True)
    return {'file': name, 'first': jobs.start, 'stop': jobs.stop, 'num_records': sum(counts),
            'class_counts': counts, 'skipped': skipped}


def convert(reader, num_examples: int, class_names: Sequence[str], out: str | os.PathLike,
            image_size: int, *, source: str, num_shards: int | None = None, skip_bad: bool = False,
            workers: int = 1, process_index: int = 0, num_processes: int = 1,
            log: Log = print) -> dict | None:
    """Writes this process's shards of examples 0..num_examples-1 of `reader` into `out`.

    Returns the dataset info once every shard is complete (from any process), else None.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f'--process-index={process_index} must be in [0, --num-processes={num_processes})')
    out = epath.Path(out)
    if (out / arrayrecord.INFO_FILE).exists():
        info = arrayrecord.read_info(out)
        if info['image_size'] != image_size or info['num_examples'] + len(info['skipped']) != num_examples:
            raise FileExistsError(f'{out} already holds a preparation of {info["source"]} at image size '
                                  f'{info["image_size"]}; use another --out')
        log(f'{out} is already prepared ({info["num_examples"]} examples): nothing to do')
        return info
    num_shards = max(1, min(num_shards or max(1, num_examples // 10_000), num_examples))
    bounds = np.linspace(0, num_examples, num_shards + 1).round().astype(int)
    mine = [k for k in range(process_index, num_shards, num_processes)]
    markers = {k: out / f'{shard_name(k, num_shards)}.json' for k in range(num_shards)}
    foreign = sorted({p.name for p in out.glob('*.array_record.json')} - {p.name for p in markers.values()})
    if foreign:
        raise FileExistsError(f'{out} holds shards of another --num-shards ({foreign[0]}); use another --out')
    todo = []
    for k in mine:
        if markers[k].exists():
            marker = json.loads(markers[k].read_text())
            if (marker['first'], marker['stop']) != (bounds[k], bounds[k + 1]):
                raise FileExistsError(f'{markers[k]} covers examples {marker["first"]}..{marker["stop"]}, '
                                      f'not {bounds[k]}..{bounds[k + 1]}: {out} was prepared from other '
                                      'data or with another --num-shards; use another --out')
        else:
            todo.append(k)
    out.mkdir(parents=True, exist_ok=True)
    total = int(sum(bounds[k + 1] - bounds[k] for k in todo))
    log(f'{source}: {num_examples} images in {len(class_names)} classes -> {num_shards} shards in {out}; '
        f'process {process_index}/{num_processes}: {len(mine) - len(todo)} of its {len(mine)} shards '
        f'done, {total} images to go')
    progress = Progress(total, log)
    jobs = [j for k in todo for j in range(bounds[k], bounds[k + 1])]
    # spawn, not fork: forking a process that has imported JAX or TF (multithreaded) can deadlock.
    pool = (multiprocessing.get_context('spawn').Pool(workers, _init_worker, (reader,))
            if workers > 1 and jobs else None)
    try:
        if pool is None:
            _init_worker(reader)
        results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
        for k in todo:
            name = shard_name(k, num_shards)
            marker = _write_shard(out, name, range(bounds[k], bounds[k + 1]), results, skip_bad, reader,
                                  len(class_names), progress, log)
            markers[k].write_text(json.dumps(marker))
    finally:
        if pool:
            pool.terminate()
    return _finalize(out, markers, class_names, image_size, source, log)


def _finalize(out: epath.Path, markers: dict, class_names: Sequence[str], image_size: int, source: str,
              log: Log) -> dict | None:
    """Writes dataset_info.json if every shard is complete (the last process to finish does it)."""
    missing = [k for k, path in markers.items() if not path.exists()]
    if missing:
        log(f'{len(missing)} shards (of other processes) are not complete yet; the process that '
            f'completes the last one writes {out / arrayrecord.INFO_FILE}')
        return None
    shards = [json.loads(markers[k].read_text()) for k in sorted(markers)]
    counts = np.sum([s['class_counts'] for s in shards], axis=0).tolist()
    skipped = [name for s in shards for name in s['skipped']]
    for name, count in zip(class_names, counts):
        if count == 0 and skipped:  # (TFDS label spaces may have empty classes of their own)
            raise ValueError(f'class {name!r} has no readable images left after skipping bad files')
    info = {'format': arrayrecord.FORMAT, 'source': source, 'image_size': image_size,
            'num_classes': len(class_names), 'class_names': list(class_names), 'class_counts': counts,
            'num_examples': sum(counts),
            'shards': [{'file': s['file'], 'num_records': s['num_records']} for s in shards
                       if s['num_records']],
            'skipped': skipped}
    (out / arrayrecord.INFO_FILE).write_text(json.dumps(info, indent=1))
    log(f'wrote {info["num_examples"]} records ({len(info["skipped"])} skipped) and '
        f'{out / arrayrecord.INFO_FILE}')
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.data.prepare', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    folder = commands.add_parser('imagefolder', help='ROOT/<class>/*.jpg -> shards')
    folder.add_argument('--src', required=True, help='image folder root, one subfolder per class')
    tfds = commands.add_parser('tfds', help='a TFDS dataset (built from --manual-dir if needed) -> shards')
    tfds.add_argument('--name', default='imagenet2012', help='TFDS builder name (imagenet2012)')
    tfds.add_argument('--tfds-data-dir', default='', help='TFDS data_dir (config.data.data_dir for '
                      "source='tfds'); '' = TFDS default")
    tfds.add_argument('--manual-dir', default='', help='folder with the manually downloaded archives')
    tfds.add_argument('--split', default='train', help='split to convert (train)')
    for sub in (folder, tfds):
        sub.add_argument('--out', required=sub is folder, default='',
                         help="output folder, local or gs:// (config.data.data_dir for source='arrayrecord')")
        sub.add_argument('--image-size', type=int, default=256, help='square output side (256)')
        sub.add_argument('--num-shards', type=int, default=None, help='shard files (default: ~10k images each)')
        sub.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                         help='decoding processes on this machine (default: all CPUs)')
        sub.add_argument('--num-processes', type=int, default=1, help='machines sharing the work (1)')
        sub.add_argument('--process-index', type=int, default=0, help='this machine, 0..num_processes-1')
        sub.add_argument('--skip-bad', action='store_true', help='skip unreadable images with a warning')
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.image_size < 1:
        parser.error(f'--image-size must be positive, got {args.image_size}')
    try:
        if args.command == 'imagefolder':
            class_names, files = list_image_folder(args.src)
            reader, count, source = _FolderReader(files, args.image_size), len(files), args.src
        else:
            builder = tfds_builder(args.name, args.tfds_data_dir, args.manual_dir,
                                   process_count=args.num_processes, log=log)
            if not args.out:
                log(f'TFDS {args.name} is built in {builder.data_dir}; train with '
                    f"config.data.source='tfds', config.data.data_dir={args.tfds_data_dir or '(default)'}")
                return 0
            class_names = builder.info.features['label'].names
            count = builder.info.splits[args.split].num_examples
            reader = _TfdsReader(args.name, args.tfds_data_dir, args.split, args.image_size)
            source = f'tfds:{args.name}/{args.split}'
        convert(reader, count, class_names, args.out, args.image_size, source=source,
                num_shards=args.num_shards, skip_bad=args.skip_bad, workers=args.workers,
                process_index=args.process_index, num_processes=args.num_processes, log=log)
    except (OSError, ValueError, RuntimeError) as e:
        log(f'error: {e}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
