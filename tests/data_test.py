"""Tests for jit_jax.data: synthetic shapes, the ADM crop and the Grain pipeline over synthetic data.

Prepared (ArrayRecord) and TFDS data are tested in tests/prepare_test.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from jit_jax import config_lib
from jit_jax.data import pipeline, preprocess, synthetic

SIZE = 16  # converted/test image side: small keeps the file fast


# ---------------------------------------------------------------- synthetic shapes

def test_synthetic_is_deterministic_per_index():
    a = synthetic.SyntheticShapes(num_examples=100)
    b = synthetic.SyntheticShapes(num_examples=100)
    late_first = b[57]['image']  # access order must not matter
    for i in (0, 3, 57, 99):
        np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[57]['image'], late_first)
    assert not np.array_equal(a[0]['image'], a[10]['image'])  # same class, different latents
    other_seed = synthetic.SyntheticShapes(num_examples=100, seed=1)
    assert not np.array_equal(a[0]['image'], other_seed[0]['image'])


def test_synthetic_cache_returns_the_rendered_image_and_stays_out_of_pickles():
    src = synthetic.SyntheticShapes(num_examples=20)
    first = src[7]['image']
    first[:] = 0  # a caller writing into its image must not reach the cache
    again = src[7]['image']
    np.testing.assert_array_equal(again, synthetic.render(7, np.random.default_rng([0, 7]), 32))
    assert src._rendered.sum() == 1
    copy = pickle.loads(pickle.dumps(src))  # what a Grain worker process receives
    assert copy._rendered.sum() == 0 and len(pickle.dumps(src)) < 10_000
    np.testing.assert_array_equal(copy[7]['image'], again)
    huge = synthetic.SyntheticShapes(num_examples=synthetic.CACHE_BYTES // (32 * 32 * 3) + 1)
    assert huge._cache is None
    np.testing.assert_array_equal(huge[7]['image'], again)


def test_synthetic_labels_are_balanced_and_images_well_formed():
    src = synthetic.SyntheticShapes(num_examples=60, image_size=24, num_classes=6)
    examples = [src[i] for i in range(len(src))]
    labels = np.array([e['label'] for e in examples])
    np.testing.assert_array_equal(labels, np.arange(60) % 6)
    np.testing.assert_array_equal(np.bincount(labels), [10] * 6)
    for e in examples:
        assert e['image'].shape == (24, 24, 3) and e['image'].dtype == np.uint8
        assert e['label'].dtype == np.int32
        assert int(e['image'].max()) - int(e['image'].min()) > 100  # a visible bright shape
    with pytest.raises(IndexError):
        src[60]
    with pytest.raises(ValueError, match='num_classes'):
        synthetic.SyntheticShapes(num_classes=11)
    assert synthetic.intrinsic_dimension() == synthetic.INTRINSIC_DIMENSION >= 10


def test_synthetic_shapes_differ_under_any_rotation_and_scale():
    """No class is a rotated / rescaled copy of another: masks mismatch by > 10% of their union."""
    coords = (np.arange(32) + 0.5) / 32 * 2.8 - 1.4
    y, x = np.meshgrid(coords, coords, indexing='ij')
    masks = [synthetic.shape_sdf(k, x, y) < 0 for k in range(synthetic.NUM_SHAPES)]
    poses = [(t, s) for t in np.linspace(0, 2 * np.pi, 36, endpoint=False) for s in (0.8, 1.0, 1.25)]
    for b in range(synthetic.NUM_SHAPES):
        moved = [synthetic.shape_sdf(b, (np.cos(t) * x + np.sin(t) * y) / s,
                                     (-np.sin(t) * x + np.cos(t) * y) / s) < 0 for t, s in poses]
        for a in range(synthetic.NUM_SHAPES):
            if a != b:
                iou = max((masks[a] & m).sum() / (masks[a] | m).sum() for m in moved)
                assert 1 - iou > 0.1, (synthetic.CLASS_NAMES[a], synthetic.CLASS_NAMES[b], iou)


def test_synthetic_classes_are_recognisable_at_32px():
    """A crude nearest-centroid classifier on a translation- and rotation-invariant feature (radial
    power spectrum of the edge map) must beat chance (10%) by far on held-out images."""
    src = synthetic.SyntheticShapes(num_examples=1200)
    n = src.image_size
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing='ij')
    ring = np.minimum(np.rint(np.hypot(fx, fy) * n).astype(int), n // 2).ravel()

    def feature(image):
        gy, gx = np.gradient(image.astype(np.float32).mean(-1))
        edges = np.hypot(gx, gy)
        power = np.abs(np.fft.fft2(edges / (edges.sum() + 1e-6))) ** 2
        return np.log(np.bincount(ring, power.ravel()) / np.bincount(ring) + 1e-12)

    features = np.stack([feature(src[i]['image']) for i in range(len(src))])
    labels = np.arange(len(src)) % 10
    train, test = slice(0, 600), slice(600, None)
    centroids = np.stack([features[train][labels[train] == c].mean(0) for c in range(10)])
    scale = features[train].std(0) + 1e-6
    dist = (((features[test][:, None] - centroids[None]) / scale) ** 2).sum(-1)
    accuracy = np.mean(dist.argmin(1) == labels[test])
    assert accuracy > 0.35, accuracy


# ---------------------------------------------------------------- ADM centre crop

def test_adm_crop_box_halves_then_centre_crops():
    """600x400 -> 100: two exact BOX halvings (4x4 blocks become pixels), no resize, crop x 25..125."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(100, 150, 3), dtype=np.uint8)
    image = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))  # 600 wide, 400 high
    out = preprocess.adm_center_crop(image, 100)
    np.testing.assert_array_equal(out, blocks[:, 25:125])


def test_adm_crop_upsamples_short_side_and_centres():
    """20x10 -> 16: bicubic to 32x16, then the middle 16 columns; a left-right ramp stays centred."""
    ramp = np.tile(np.linspace(0, 255, 20).astype(np.uint8)[None, :, None], (10, 1, 3))
    out = preprocess.adm_center_crop(Image.fromarray(ramp), 16)
    assert out.shape == (16, 16, 3)
    expected = np.asarray(Image.fromarray(ramp).resize((32, 16), Image.BICUBIC))[:, 8:24]
    np.testing.assert_array_equal(out, expected)
    assert abs(out.mean() - 127.5) < 3  # centre crop of a symmetric ramp


# ---------------------------------------------------------------- pipeline

def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def data_config(**fields):
    """config_lib.base().data (locked: a misspelt field fails) for small synthetic runs, updated."""
    data = config_lib.base().data
    data.update(dict(source='synthetic', image_size=SIZE, num_classes=10, num_train_examples=64,
                     global_batch_size=4, num_workers=0, read_threads=2, prefetch_buffer_size=16))
    data.update(fields)
    return data


def _iterator(seed=0, process_index=0, process_count=1, **fields):
    return pipeline.make_train_iterator(data_config(**fields), seed=seed, process_index=process_index,
                                        process_count=process_count)


def test_batches_have_the_model_layout():
    batch = next(_iterator(global_batch_size=6, process_count=2, process_index=1))
    assert batch['image'].shape == (3, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (3,) and batch['label'].dtype == np.int32
    assert -1.0 <= batch['image'].min() < -0.5 and 0.5 < batch['image'].max() <= 1.0
    assert np.all((batch['label'] >= 0) & (batch['label'] < 10))


def test_pipeline_is_deterministic_per_seed():
    _assert_same(_take(_iterator(seed=3), 3), _take(_iterator(seed=3), 3))
    other = _take(_iterator(seed=4), 3)
    assert not all(np.array_equal(a['label'], b['label'])
                   for a, b in zip(_take(_iterator(seed=3), 3), other))
    changed_data_seed = _take(_iterator(seed=3, shuffle_seed=1), 3)
    assert not all(np.array_equal(a['label'], b['label'])
                   for a, b in zip(_take(_iterator(seed=3), 3), changed_data_seed))


def test_iterator_state_round_trip():
    iterator = _iterator(seed=5)
    _take(iterator, 14)
    state = iterator.get_state()
    expected = _take(iterator, 4)  # 64 examples / 4 = 16 batches per epoch: this crosses into epoch 2
    resumed = _iterator(seed=5)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


def test_iterator_state_round_trip_through_orbax(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    iterator = _iterator(seed=6, num_train_examples=12)  # 3 batches per epoch: the resume crosses epochs
    _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 5)
    resumed = _iterator(seed=6, num_train_examples=12)
    with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same(_take(resumed, 5), expected)


def _source_index(source) -> dict[bytes, int]:
    return {source[i]['image'].tobytes(): i for i in range(len(source))}


def _indices(batch, lookup) -> list[int]:
    images = np.rint((batch['image'] + 1.0) * 127.5).astype(np.uint8)
    return [lookup[image.tobytes()] for image in images]


def test_process_shards_are_disjoint_cover_the_data_and_reshuffle_each_epoch():
    lookup = _source_index(synthetic.SyntheticShapes(num_examples=24, image_size=SIZE))
    seen = []
    for process_index in range(2):
        # 12 examples per process, 2 per local batch: 6 batches per epoch; take two epochs.
        iterator = _iterator(num_train_examples=24, process_index=process_index, process_count=2,
                             random_flip=False)
        order = [i for batch in _take(iterator, 12) for i in _indices(batch, lookup)]
        first, second = order[:12], order[12:]
        assert sorted(first) == sorted(second) and len(set(first)) == 12
        assert first != second  # a new order every epoch
        seen.append(set(first))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(24))


def test_flip_is_applied_to_about_half():
    flipped = _take(_iterator(seed=7, num_train_examples=200, global_batch_size=8), 25)
    plain = _take(_iterator(seed=7, num_train_examples=200, global_batch_size=8, random_flip=False), 25)
    was_flipped = []
    for f, p in zip(flipped, plain):
        np.testing.assert_array_equal(f['label'], p['label'])  # same order: flip has its own seed
        for fi, pi in zip(f['image'], p['image']):
            mirrored = np.array_equal(fi, pi[:, ::-1])
            assert mirrored or np.array_equal(fi, pi)
            was_flipped.append(mirrored)
    assert 0.35 < np.mean(was_flipped) < 0.65, np.mean(was_flipped)


def test_pipeline_errors_name_the_config_field(tmp_path):
    with pytest.raises(ValueError, match='config.data.global_batch_size'):
        _iterator(global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match='config.data.source'):
        _iterator(source='imagenet')
    missing = tmp_path / 'no_such_dir'
    with pytest.raises(FileNotFoundError, match=f'{missing}.*config.data.data_dir.*jit_jax.data.prepare'):
        _iterator(source='arrayrecord', data_dir=str(missing))
    with pytest.raises(ValueError, match='config.data.data_dir'):
        _iterator(source='arrayrecord', data_dir='')
    with pytest.raises(KeyError, match='config.data.random_flip'):
        pipeline.make_train_iterator({k: v for k, v in data_config().items() if k != 'random_flip'},
                                     seed=0, process_index=0, process_count=1)


def test_worker_processes_give_the_in_process_batches_and_resume():
    """One Grain worker process sees the whole (unsliced) pipeline, so it must reproduce the
    in-process order exactly; its state must resume it too. (State is only valid for the same
    num_workers: with n workers each takes every n-th element.)"""
    expected = _take(_iterator(seed=8), 6)
    iterator = _iterator(seed=8, num_workers=1)
    _assert_same(_take(iterator, 3), expected[:3])
    state = iterator.get_state()
    resumed = _iterator(seed=8, num_workers=1)
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), expected[3:])


def test_every_field_the_pipeline_reads_is_defined_by_the_config():
    assert set(pipeline.FIELDS) <= set(config_lib.base().data)
