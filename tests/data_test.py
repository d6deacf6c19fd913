"""Tests for jit_jax.data: synthetic shapes, the image-folder converter and the Grain pipeline."""

from __future__ import annotations

import json
import pathlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from jit_jax.data import imagefolder, pipeline, synthetic

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
    out = imagefolder.adm_center_crop(image, 100)
    np.testing.assert_array_equal(out, blocks[:, 25:125])


def test_adm_crop_upsamples_short_side_and_centres():
    """20x10 -> 16: bicubic to 32x16, then the middle 16 columns; a left-right ramp stays centred."""
    ramp = np.tile(np.linspace(0, 255, 20).astype(np.uint8)[None, :, None], (10, 1, 3))
    out = imagefolder.adm_center_crop(Image.fromarray(ramp), 16)
    assert out.shape == (16, 16, 3)
    expected = np.asarray(Image.fromarray(ramp).resize((32, 16), Image.BICUBIC))[:, 8:24]
    np.testing.assert_array_equal(out, expected)
    assert abs(out.mean() - 127.5) < 3  # centre crop of a symmetric ramp


def test_tfds_example_crop_matches_folder_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8)
    out = pipeline.tfds_example_to_crop({'image': image, 'label': np.int64(7), 'file_name': b'x'},
                                        image_size=SIZE)
    np.testing.assert_array_equal(out['image'], imagefolder.adm_center_crop(Image.fromarray(image), SIZE))
    assert out['label'] == 7 and out['label'].dtype == np.int32
    gray = pipeline.tfds_example_to_crop({'image': image[..., :1], 'label': 3}, image_size=SIZE)
    assert gray['image'].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(gray['image'][..., 0], gray['image'][..., 2])


# ---------------------------------------------------------------- image folder conversion

def _make_folder(root: pathlib.Path) -> dict[str, tuple[int, Image.Image]]:
    """Classes sorted by name: ant=0, bee=1, cat=2. Odd sizes, grayscale, RGBA, palette, JPEG."""
    rng = np.random.default_rng(2)

    def noise(h, w, c):
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)

    images = {
        'cat/a.png': Image.fromarray(noise(40, 30, 3)),
        'cat/b.JPEG': Image.fromarray(noise(70, 130, 3)),
        'ant/gray.png': Image.fromarray(noise(33, 20, 1)[..., 0], mode='L'),
        'ant/alpha.png': Image.fromarray(noise(33, 33, 4), mode='RGBA'),
        'bee/gray.jpg': Image.fromarray(noise(64, 100, 1)[..., 0], mode='L'),
        'bee/pal.png': Image.fromarray(noise(17, 90, 3)).convert('P'),
    }
    written = {}
    for name, image in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format='JPEG' if path.suffix.lower() in ('.jpg', '.jpeg') else 'PNG')
        written[str(path)] = ({'ant': 0, 'bee': 1, 'cat': 2}[path.parent.name], image)
    (root / 'cat' / 'notes.txt').write_text('not an image')  # ignored
    return written


def _expected_crop(path: str) -> np.ndarray:
    """What the converter must store: the file as decoded by Pillow, as RGB, ADM-cropped."""
    with Image.open(path) as image:
        return imagefolder.adm_center_crop(image.convert('RGB'), SIZE)


def test_folder_round_trip(tmp_path):
    files = _make_folder(tmp_path / 'src')
    info = imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE, num_shards=2, log=lambda m: None)
    assert info['class_names'] == ['ant', 'bee', 'cat'] and info['class_counts'] == [2, 2, 2]
    assert len(info['shards']) == 2
    assert json.loads((tmp_path / 'out' / imagefolder.INFO_FILE).read_text()) == info

    source = imagefolder.ArrayRecordImages(tmp_path / 'out', SIZE)
    assert len(source) == 6
    by_path = sorted(files, key=lambda p: (files[p][0], pathlib.Path(p).name))
    for index, path in enumerate(by_path):
        example = source[index]
        assert example['label'] == files[path][0] and example['label'].dtype == np.int32
        assert example['image'].shape == (SIZE, SIZE, 3) and example['image'].dtype == np.uint8
        np.testing.assert_array_equal(example['image'], _expected_crop(path), err_msg=path)
    # Grayscale became RGB with equal channels.
    gray = source[by_path.index(str(tmp_path / 'src' / 'ant' / 'gray.png'))]['image']
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])

    with pytest.raises(FileExistsError, match='--overwrite'):
        imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE, log=lambda m: None)


def test_converter_command_line(tmp_path, capsys):
    _make_folder(tmp_path / 'src')
    argv = ['--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'), '--image-size', '8',
            '--num-workers', '1']
    assert imagefolder.main(argv) == 0
    assert 'converted 6/6 images' in capsys.readouterr().err
    assert imagefolder.read_info(tmp_path / 'out')['image_size'] == 8
    assert imagefolder.main(['--src', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o2')]) == 1
    assert str(tmp_path / 'nowhere') in capsys.readouterr().err


def test_corrupt_image_fails_naming_the_file_unless_skipped(tmp_path):
    _make_folder(tmp_path / 'src')
    bad = tmp_path / 'src' / 'bee' / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    with pytest.raises(imagefolder.BadImageError, match=str(bad)):
        imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE, log=lambda m: None)
    assert not (tmp_path / 'out' / imagefolder.INFO_FILE).exists()

    messages = []
    info = imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE, skip_bad=True,
                               log=messages.append)
    assert info['skipped'] == [str(bad)] and info['class_counts'] == [2, 2, 2]
    assert any('warning' in m and str(bad) in m for m in messages)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'missing')):
        imagefolder.convert(tmp_path / 'missing', tmp_path / 'out', SIZE)
    (tmp_path / 'src' / 'empty').mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / 'src' / 'empty')):
        imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE)


def test_reader_rejects_wrong_image_size(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    out = tmp_path / 'out'
    out.mkdir()
    writer = ArrayRecordWriter(str(out / 'train-00000-of-00001.array_record'), 'group_size:1')
    writer.write(imagefolder.encode_record(np.zeros((SIZE, SIZE, 3), np.uint8), 0))
    writer.write(imagefolder.encode_record(np.zeros((SIZE, SIZE + 2, 3), np.uint8), 1))
    writer.close()
    info = {'format': imagefolder.FORMAT, 'image_size': SIZE, 'num_classes': 2,
            'class_names': ['a', 'b'], 'class_counts': [1, 1], 'num_examples': 2, 'skipped': [],
            'shards': [{'file': 'train-00000-of-00001.array_record', 'num_records': 2}]}
    (out / imagefolder.INFO_FILE).write_text(json.dumps(info))

    source = imagefolder.ArrayRecordImages(out, SIZE)
    assert source[0]['image'].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r'record 1 .*train-00000-of-00001'):
        source[1]
    with pytest.raises(ValueError, match='config.data.image_size'):
        imagefolder.ArrayRecordImages(out, SIZE * 2)
    assert msgpack.unpackb(imagefolder.encode_record(np.zeros((2, 2, 3), np.uint8), 5))['label'] == 5


# ---------------------------------------------------------------- pipeline

def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def _iterator(**kwargs):
    fields = dict(image_size=SIZE, num_train_examples=64, global_batch_size=4, read_threads=2,
                  process_index=0, process_count=1)
    return pipeline.make_train_iterator(**{**fields, **kwargs})


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


def test_pipeline_over_converted_folder(tmp_path):
    files = _make_folder(tmp_path / 'src')
    imagefolder.convert(tmp_path / 'src', tmp_path / 'out', SIZE, log=lambda m: None)
    iterator = _iterator(source='arrayrecord', data_dir=str(tmp_path / 'out'), num_classes=3,
                         global_batch_size=3, random_flip=False)
    batches = _take(iterator, 2)  # exactly one epoch
    labels = np.concatenate([b['label'] for b in batches])
    np.testing.assert_array_equal(np.sort(labels), [0, 0, 1, 1, 2, 2])
    got = sorted(np.rint((image + 1) * 127.5).astype(np.uint8).tobytes()
                 for batch in batches for image in batch['image'])
    assert got == sorted(_expected_crop(path).tobytes() for path in files)
    with pytest.raises(ValueError, match='config.data.num_classes'):
        _iterator(source='arrayrecord', data_dir=str(tmp_path / 'out'), num_classes=2)


def test_pipeline_accepts_a_config_dict():
    import ml_collections

    config = ml_collections.ConfigDict({'source': 'synthetic', 'name': '', 'data_dir': '',
                                        'manual_dir': '', 'image_size': 8, 'num_classes': 4,
                                        'global_batch_size': 4, 'num_workers': 0, 'shuffle_seed': 0,
                                        'cache_size': 0})  # a field this module does not use
    batch = next(pipeline.make_train_iterator(config, seed=0, process_index=0, process_count=1))
    assert batch['image'].shape == (4, 8, 8, 3) and batch['label'].max() < 4


def test_pipeline_errors_name_the_config_field(tmp_path):
    with pytest.raises(ValueError, match='config.data.global_batch_size'):
        _iterator(global_batch_size=5, process_count=2)
    with pytest.raises(ValueError, match='config.data.source'):
        _iterator(source='imagenet')
    missing = tmp_path / 'no_such_dir'
    with pytest.raises(FileNotFoundError, match=f'{missing}.*config.data.data_dir'):
        _iterator(source='arrayrecord', data_dir=str(missing))
    with pytest.raises(ValueError, match='config.data.data_dir'):
        _iterator(source='arrayrecord', data_dir='')
    with pytest.raises(TypeError, match='batch_size'):
        _iterator(batch_size=4)


def test_tfds_source_not_prepared_says_how_to_prepare(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    with pytest.raises(FileNotFoundError, match='not prepared.*config.data.manual_dir'):
        _iterator(source='tfds', data_dir=str(tmp_path), num_classes=1000)


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
