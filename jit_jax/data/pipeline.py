"""Per-host training input: a checkpointable Grain iterator of {'image', 'label'} batches.

Order of operations (as in the official JiT recipe, but built so that its state is a few integers):

    source -> this process's shard -> shuffle (new order each epoch) -> repeat forever
           -> random horizontal flip -> batch(global_batch_size // process_count) -> x / 127.5 - 1

The ADM centre crop (jit_jax.data.preprocess) is not in this list: prepared ArrayRecord data holds it
already, the synthetic source renders at the target size, and only TFDS decodes-and-crops here.
Training only reads data prepared by `python -m jit_jax.data.prepare`; it never builds a dataset.
Everything random is a pure function of (seed, config.data.shuffle_seed, process_index, element index), which is why the iterator
state (get_state / set_state, or grain.checkpoint.CheckpointSave / CheckpointRestore in Orbax) is
enough to resume exactly.

Each host feeds only its local slice; the training loop turns it into a global array with
jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import grain
import numpy as np
from jit_jax.data import arrayrecord, preprocess, synthetic

# The config.data fields this module reads (config_lib.base() defines them all); no defaults here,
# so a pipeline can never silently disagree with the config.
FIELDS = ('source', 'name', 'data_dir', 'image_size', 'num_classes', 'global_batch_size', 'num_workers',
          'shuffle_seed', 'num_train_examples', 'random_flip', 'read_threads', 'prefetch_buffer_size')
SOURCES = ('synthetic', 'arrayrecord', 'tfds')


def read_fields(config_data: Any) -> dict[str, Any]:
    """The FIELDS of `config.data` (a ConfigDict or mapping); a missing one is an error naming it."""
    given = config_data.to_dict() if hasattr(config_data, 'to_dict') else dict(config_data)
    missing = [f'config.data.{name}' for name in FIELDS if name not in given]
    if missing:
        raise KeyError(f'{missing} missing from the data config; build it from '
                       'jit_jax.config_lib.base(), which defines every field')
    return {name: given[name] for name in FIELDS}


def tfds_example_to_crop(example: Mapping[str, Any], image_size: int) -> dict[str, np.ndarray]:
    """A decoded TFDS example (image uint8[H, W, 3] of any size) -> the ADM-cropped training example.

    TFDS stores the original JPEGs, so the crop that prepared ArrayRecord data holds already has to
    happen on every read here.
    """
    return {'image': preprocess.array_to_crop(example['image'], image_size),
            'label': np.int32(example['label'])}


def _tfds_source(fields: dict[str, Any]) -> grain.MapDataset:
    """The random-access source of a TFDS dataset built in ArrayRecord format (never built here:
    building ImageNet takes hours in one process, so `python -m jit_jax.data.prepare tfds` does it)."""
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    name, data_dir = fields['name'], fields['data_dir'] or None
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
        raise FileNotFoundError(
            f'TFDS dataset {name} is not built in {builder.data_dir} (config.data.name / '
            f'config.data.data_dir); build it once, before training, with `{arrayrecord.PREPARE_HINT} '
            f'tfds --name {name} --manual-dir DIR_WITH_THE_ARCHIVES'
            f'{" --tfds-data-dir " + str(data_dir) if data_dir else ""}`')
    num_classes = builder.info.features['label'].num_classes
    if num_classes > fields['num_classes']:
        raise ValueError(f'TFDS {name} has {num_classes} classes but config.data.num_classes is '
                         f'{fields["num_classes"]}')
    source = builder.as_data_source(split='train')
    return grain.MapDataset.source(source).map(
        functools.partial(tfds_example_to_crop, image_size=fields['image_size']))


def make_source(fields: dict[str, Any]) -> grain.MapDataset:
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
                             f'set it to the output of `{arrayrecord.PREPARE_HINT}`')
        images = arrayrecord.ArrayRecordImages(data_dir, fields['image_size'])
        if images.num_classes > fields['num_classes']:
            raise ValueError(f'{data_dir} has {images.num_classes} classes but '
                             f'config.data.num_classes is {fields["num_classes"]}')
        return grain.MapDataset.source(images)
    if source == 'tfds':
        return _tfds_source(fields)
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


def make_train_dataset(config_data: Any, *, seed: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """The pipeline as a grain.IterDataset (see make_train_iterator)."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults; tests and the converter never need it

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    fields = read_fields(config_data)
    local_batch = _validate(fields, seed, process_index, process_count)
    # One seed for the shuffle (shared by all processes: their shards are disjoint anyway) and one
    # per process for the flips, both derived from the training seed and the data seed.
    shuffle_seed = int(np.random.SeedSequence([seed, fields['shuffle_seed']]).generate_state(1)[0])
    flip_seed = int(np.random.SeedSequence(
        [seed, fields['shuffle_seed'], 1 + process_index]).generate_state(1)[0])

    dataset = make_source(fields)
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


def make_train_iterator(config_data: Any, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """This process's endless iterator of {'image': f32[b, h, w, 3] in [-1, 1], 'label': i32[b]}.

    b = global_batch_size // process_count. `config_data` is `config.data` (a ConfigDict or mapping
    with every field of FIELDS).
    `seed` is the run's seed (config.seed); config.data.shuffle_seed is mixed into it.
    process_index / process_count default to jax.process_index() / jax.process_count().
    The iterator supports get_state() / set_state(), and grain.checkpoint.CheckpointSave(it) /
    CheckpointRestore(it) inside an Orbax Composite. A saved state resumes only a pipeline with the
    same fields, process_count and num_workers (n workers each take every n-th element, so the
    batch order depends on n).
    """
    return iter(make_train_dataset(config_data, seed=seed, process_index=process_index,
                                   process_count=process_count))
