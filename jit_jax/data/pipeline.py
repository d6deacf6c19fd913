"""Per-host training input: a checkpointable Grain iterator of {'image', 'label'} batches.

Order of operations (as in the official JiT recipe, but built so that its state is a few integers):

    source -> this process's shard -> shuffle (new order each epoch) -> repeat forever
           -> random horizontal flip -> batch(global_batch_size // process_count) -> x / 127.5 - 1

The ADM centre crop is not in this list: the image-folder converter did it once, the synthetic source
renders at the target size, and only TFDS decodes-and-crops here. Everything random is a pure
function of (seed, config.data.shuffle_seed, process_index, element index), which is why the iterator
state (get_state / set_state, or grain.checkpoint.CheckpointSave / CheckpointRestore in Orbax) is
enough to resume exactly.

Each host feeds only its local slice; the training loop turns it into a global array with
jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

from jit_jax.data import imagefolder
from jit_jax.data import synthetic

# Every config.data field this module reads, with the default used when the config lacks it.
DEFAULTS: dict[str, Any] = {
    'source': 'synthetic',       # 'synthetic' | 'arrayrecord' | 'tfds'
    'name': '',                  # TFDS dataset name ('' -> 'imagenet2012'); unused otherwise
    'data_dir': '',              # arrayrecord: converted shards; tfds: TFDS data_dir ('' = TFDS default)
    'manual_dir': '',            # tfds: folder with the ImageNet tars, to prepare on first use
    'image_size': 32,
    'num_classes': 10,
    'global_batch_size': 8,      # over all processes; each process yields global // process_count
    'num_workers': 0,            # Grain worker processes; 0 = in this process (threads only)
    'shuffle_seed': 0,           # mixed with the training seed; change it to reshuffle only the data
    'num_train_examples': 50_000,  # synthetic: dataset size
    'random_flip': True,         # the official augmentation; off only for ablations and tests
    'read_threads': 8,           # threads decoding elements in each process
    'prefetch_buffer_size': 256,  # elements (not batches) read ahead per process
}

SOURCES = ('synthetic', 'arrayrecord', 'tfds')


def resolve_fields(config_data: Any = None, **overrides: Any) -> dict[str, Any]:
    """DEFAULTS, updated by the ConfigDict / mapping `config_data`, updated by keyword overrides.

    Fields of config_data this module does not use are ignored (others read them); unknown keyword
    overrides are an error, since there they can only be typos.
    """
    fields = dict(DEFAULTS)
    if config_data is not None:
        given = config_data.to_dict() if hasattr(config_data, 'to_dict') else dict(config_data)
        fields.update({k: v for k, v in given.items() if k in DEFAULTS})
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f'unknown data field(s) {unknown}; known: {sorted(DEFAULTS)}')
    fields.update(overrides)
    return fields


def tfds_example_to_crop(example: Mapping[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """A decoded TFDS example (image uint8[H, W, 3] of any size) -> the ADM-cropped training example.

    ImageNet in TFDS is stored as the original JPEGs, so the crop that the converter does once for
    folder data has to happen on every read here.
    """
    image = np.asarray(example['image'])
    if image.ndim == 2:
        image = image[..., None]
    rgb = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert('RGB')
    return {'image': imagefolder.adm_center_crop(rgb, image_size),
            'label': np.int32(example['label'])}


def _tfds_source(fields: dict[str, Any], process_count: int) -> grain.MapDataset:
    """The TFDS random-access source, preparing it from config.data.manual_dir if needed.

    Random access needs the ArrayRecord file format; preparing needs TensorFlow and the ImageNet
    tars and takes hours, so it is done by one process only: multi-host jobs must prepare first.
    """
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    name = fields['name'] or 'imagenet2012'
    data_dir = fields['data_dir'] or None
    manual_dir = fields['manual_dir']
    if (data_dir and not manual_dir and not str(data_dir).startswith('gs://')
            and not pathlib.Path(data_dir).is_dir()):
        raise FileNotFoundError(f'TFDS data directory {data_dir} (config.data.data_dir) does not exist')
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
        hint = (f'prepare it once with `tfds build {name} --data_dir={data_dir or "~/tensorflow_datasets"}'
                f' --manual_dir=DIR --file_format=array_record` (needs tensorflow; DIR holds the '
                'ImageNet tars)')
        if not manual_dir:
            raise FileNotFoundError(f'TFDS dataset {name} is not prepared in {builder.data_dir}; set '
                                    f'config.data.manual_dir to prepare it on first use, or {hint}')
        if process_count > 1:
            raise RuntimeError(f'TFDS dataset {name} is not prepared in {builder.data_dir}; with '
                               f'{process_count} processes {hint} before training')
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format='array_record')
    num_classes = builder.info.features['label'].num_classes
    if num_classes > fields['num_classes']:
        raise ValueError(f'TFDS {name} has {num_classes} classes but config.data.num_classes is '
                         f'{fields["num_classes"]}')
    source = builder.as_data_source(split='train')
    return grain.MapDataset.source(source).map(
        functools.partial(tfds_example_to_crop, image_size=fields['image_size']))


def make_source(fields: dict[str, Any], *, process_count: int = 1) -> grain.MapDataset:
    """The full (unsharded) dataset of uint8 {'image': [s, s, 3], 'label'} examples."""
    source = fields['source']
    if source == 'synthetic':
        return grain.MapDataset.source(synthetic.SyntheticShapes(
            num_examples=fields['num_train_examples'], image_size=fields['image_size'],
            num_classes=fields['num_classes']))
    if source == 'arrayrecord':
        data_dir = fields['data_dir']
        if not data_dir:
            raise ValueError('config.data.source is "arrayrecord" but config.data.data_dir is empty; '
                             'set it to the output of `python -m jit_jax.data.imagefolder`')
        images = imagefolder.ArrayRecordImages(data_dir, fields['image_size'])
        if images.num_classes > fields['num_classes']:
            raise ValueError(f'{data_dir} has {images.num_classes} classes but '
                             f'config.data.num_classes is {fields["num_classes"]}')
        return grain.MapDataset.source(images)
    if source == 'tfds':
        return _tfds_source(fields, process_count)
    raise ValueError(f'unknown config.data.source={source!r}; expected one of {SOURCES}')


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
        return {**example, 'image': example['image'][:, ::-1]}
    return example


def _to_model_range(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 [0, 255] -> f32 [-1, 1], as the reference does on the GPU (x / 255 * 2 - 1).

    Done per batch rather than per example: the same numbers, one vectorised op, and the batch is
    stacked as uint8 (4x less copying).
    """
    return {'image': batch['image'].astype(np.float32) / np.float32(127.5) - np.float32(1.0),
            'label': batch['label'].astype(np.int32)}


def _validate(fields: dict[str, Any], seed: int, process_index: int, process_count: int) -> int:
    """Checks the fields the pipeline depends on; returns the per-process batch size."""
    batch = fields['global_batch_size']
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
    if batch < 1 or batch % process_count:
        raise ValueError(f'config.data.global_batch_size={batch} must be a positive multiple of the '
                         f'process count {process_count} (each process yields an equal slice)')
    if seed < 0 or fields['shuffle_seed'] < 0:
        raise ValueError(f'seeds must be >= 0, got seed={seed}, '
                         f'config.data.shuffle_seed={fields["shuffle_seed"]}')
    if fields['num_workers'] < 0:
        raise ValueError(f'config.data.num_workers={fields["num_workers"]} must be >= 0')
    return batch // process_count


def make_train_dataset(config_data: Any = None, *, seed: int = 0, process_index: int | None = None,
                       process_count: int | None = None, **overrides: Any) -> grain.IterDataset:
    """The pipeline as a grain.IterDataset (see make_train_iterator)."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults; tests and the converter never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    fields = resolve_fields(config_data, **overrides)
    local_batch = _validate(fields, seed, process_index, process_count)
    # One seed for the shuffle (shared by all processes: their shards are disjoint anyway) and one
    # per process for the flips, both derived from the training seed and the data seed.
    shuffle_seed = int(np.random.SeedSequence([seed, fields['shuffle_seed']]).generate_state(1)[0])
    flip_seed = int(np.random.SeedSequence(
        [seed, fields['shuffle_seed'], 1 + process_index]).generate_state(1)[0])

    dataset = make_source(fields, process_count=process_count)
    if len(dataset) < process_count:
        raise ValueError(f'{len(dataset)} examples cannot be split over {process_count} processes')
    # Strided slices: disjoint, together they cover every example, sizes differ by at most one.
    dataset = dataset[process_index::process_count]
    # shuffle-then-repeat: grain reseeds the shuffle for each epoch, like DistributedSampler.set_epoch.
    dataset = dataset.shuffle(seed=shuffle_seed).repeat(None)
    if fields['random_flip']:
        dataset = dataset.random_map(_random_flip, seed=flip_seed)
    # Threads read elements (so the read-ahead buffer is counted in images, not batches); batching
    # and the range conversion run on the iterator side.
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=fields['read_threads'], prefetch_buffer_size=fields['prefetch_buffer_size']))
    iter_dataset = iter_dataset.batch(local_batch, drop_remainder=True).map(_to_model_range)
    if fields['num_workers'] > 0:
        # Grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) they are
        # unparsed and Grain raises UnparsedFlagAccessError. Marking them parsed keeps the defaults.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=fields['num_workers'], per_worker_buffer_size=2))
    return iter_dataset


def make_train_iterator(config_data: Any = None, *, seed: int = 0, process_index: int | None = None,
                        process_count: int | None = None,
                        **overrides: Any) -> grain.DatasetIterator:
    """This process's endless iterator of {'image': f32[b, h, w, 3] in [-1, 1], 'label': i32[b]}.

    b = global_batch_size // process_count. `config_data` is `config.data` (a ConfigDict or mapping;
    missing fields take DEFAULTS); keyword overrides replace fields (tests use them alone).
    `seed` is the run's seed (config.seed); config.data.shuffle_seed is mixed into it.
    process_index / process_count default to jax.process_index() / jax.process_count().
    The iterator supports get_state() / set_state(), and grain.checkpoint.CheckpointSave(it) /
    CheckpointRestore(it) inside an Orbax Composite. A saved state resumes only a pipeline with the
    same fields, process_count and num_workers (n workers each take every n-th element, so the
    batch order depends on n).
    """
    return iter(make_train_dataset(config_data, seed=seed, process_index=process_index,
                                   process_count=process_count, **overrides))
