"""Prepared data end to end: `python -m jit_jax.data.prepare` (image folder and TFDS ImageNet) and the
training pipeline over its output, including a real TFDS imagenet2012 build from fake archives."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from jit_jax import config_lib
from jit_jax.data import arrayrecord, pipeline, prepare

SIZE = 16


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM / JiT center_crop_arr written out directly: BOX halvings while the short side is >= 2x the
    target, BICUBIC resize of the short side to the target (Python rounding), centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                         resample=Image.BICUBIC)
    pixels = np.array(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


def _file_crop(path) -> np.ndarray:
    with Image.open(path) as image:
        return reference_crop(image.convert('RGB'), SIZE)


def data_config(**fields):
    data = config_lib.base().data
    data.update(dict(image_size=SIZE, global_batch_size=4, num_workers=0, read_threads=1,
                     prefetch_buffer_size=8, random_flip=False))
    data.update(fields)
    return data


def _batches(n, seed=0, process_index=0, process_count=1, **fields):
    iterator = pipeline.make_train_iterator(data_config(**fields), seed=seed, process_index=process_index,
                                            process_count=process_count)
    return [next(iterator) for _ in range(n)]


def _u8(image: np.ndarray) -> np.ndarray:
    return np.rint((image + 1) * 127.5).astype(np.uint8)


def _quiet(message):
    del message


# ---------------------------------------------------------------- image folder

def _make_folder(root) -> dict[str, int]:
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
    labels = {}
    for name, image in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format='JPEG' if path.suffix.lower() in ('.jpg', '.jpeg') else 'PNG')
        labels[str(path)] = {'ant': 0, 'bee': 1, 'cat': 2}[path.parent.name]
    (root / 'cat' / 'notes.txt').write_text('not an image')  # ignored
    return labels


def _records(out) -> list[tuple[bytes, int]]:
    source = arrayrecord.ArrayRecordImages(out, SIZE)
    return [(source[i]['image'].tobytes(), int(source[i]['label'])) for i in range(len(source))]


def test_image_folder_is_prepared_with_the_reference_crop(tmp_path, capsys):
    labels = _make_folder(tmp_path / 'src')
    argv = ['imagefolder', '--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'),
            '--image-size', str(SIZE), '--num-shards', '2', '--workers', '1']
    assert prepare.main(argv) == 0
    err = capsys.readouterr().err
    assert 'prepared 6/6 images' in err and 'img/s' in err and 'eta' in err
    info = arrayrecord.read_info(tmp_path / 'out')
    assert info['class_names'] == ['ant', 'bee', 'cat'] and info['class_counts'] == [2, 2, 2]
    assert len(info['shards']) == 2
    in_order = sorted(labels, key=lambda p: (labels[p], p))
    assert _records(tmp_path / 'out') == [(_file_crop(p).tobytes(), labels[p]) for p in in_order]
    assert prepare.main(argv) == 0  # already prepared: a no-op
    assert 'nothing to do' in capsys.readouterr().err


def test_preparation_resumes_and_splits_over_processes(tmp_path):
    _make_folder(tmp_path / 'src')
    class_names, files = prepare.list_image_folder(tmp_path / 'src')
    reader = prepare._FolderReader(files, SIZE)

    def run(out, **kwargs):
        messages = []
        info = prepare.convert(reader, len(files), class_names, out, SIZE, source='src', num_shards=3,
                               log=messages.append, **kwargs)
        return info, '\n'.join(messages)

    expected, _ = run(tmp_path / 'one')
    # Two processes: the first leaves the dataset unfinished (no info), the second completes it.
    info, log = run(tmp_path / 'two', process_index=0, num_processes=2)
    assert info is None and 'not complete yet' in log
    assert not (tmp_path / 'two' / arrayrecord.INFO_FILE).exists()
    info, _ = run(tmp_path / 'two', process_index=1, num_processes=2)
    assert info == expected and _records(tmp_path / 'two') == _records(tmp_path / 'one')
    # A crash mid-shard: shard 1 half written (no marker), info not written. The rerun redoes only it.
    out = tmp_path / 'one'
    shard = out / prepare.shard_name(1, 3)
    (out / arrayrecord.INFO_FILE).unlink()
    (out / f'{shard.name}.json').unlink()
    shard.write_bytes(shard.read_bytes()[:10])
    untouched = (out / prepare.shard_name(0, 3)).stat().st_mtime_ns
    info, log = run(out, workers=2)  # and through the decoding process pool
    assert '2 of its 3 shards done, 2 images to go' in log
    assert info == expected and _records(out) == _records(tmp_path / 'two')
    assert (out / prepare.shard_name(0, 3)).stat().st_mtime_ns == untouched
    with pytest.raises(FileExistsError, match='of another --num-shards'):
        (out / arrayrecord.INFO_FILE).unlink()
        prepare.convert(reader, len(files), class_names, out, SIZE, source='src', num_shards=2, log=_quiet)


def test_corrupt_image_fails_naming_the_file_unless_skipped(tmp_path):
    _make_folder(tmp_path / 'src')
    bad = tmp_path / 'src' / 'bee' / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    argv = ['imagefolder', '--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'),
            '--image-size', str(SIZE), '--workers', '1']
    assert prepare.main(argv) == 1
    assert not (tmp_path / 'out' / arrayrecord.INFO_FILE).exists()
    assert prepare.main([*argv, '--skip-bad']) == 0
    info = arrayrecord.read_info(tmp_path / 'out')
    assert info['skipped'] == [str(bad)] and info['class_counts'] == [2, 2, 2]


def test_folder_errors_name_the_path(tmp_path, capsys):
    assert prepare.main(['imagefolder', '--src', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')]) == 1
    assert str(tmp_path / 'missing') in capsys.readouterr().err
    (tmp_path / 'src' / 'empty').mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / 'src' / 'empty')):
        prepare.list_image_folder(tmp_path / 'src')


def test_reader_rejects_wrong_image_size(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    out = tmp_path / 'out'
    out.mkdir()
    writer = ArrayRecordWriter(str(out / 'train-00000-of-00001.array_record'), 'group_size:1')
    writer.write(arrayrecord.encode_record(np.zeros((SIZE, SIZE, 3), np.uint8), 0))
    writer.write(arrayrecord.encode_record(np.zeros((SIZE, SIZE + 2, 3), np.uint8), 1))
    writer.close()
    info = {'format': arrayrecord.FORMAT, 'image_size': SIZE, 'num_classes': 2,
            'class_names': ['a', 'b'], 'class_counts': [1, 1], 'num_examples': 2, 'skipped': [],
            'shards': [{'file': 'train-00000-of-00001.array_record', 'num_records': 2}]}
    (out / arrayrecord.INFO_FILE).write_text(json.dumps(info))
    source = arrayrecord.ArrayRecordImages(out, SIZE)
    assert source[0]['image'].shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match=r'record 1 .*train-00000-of-00001'):
        source[1]
    with pytest.raises(ValueError, match='config.data.image_size'):
        arrayrecord.ArrayRecordImages(out, SIZE * 2)


def test_pipeline_over_a_prepared_folder_crops_and_flips(tmp_path):
    labels = _make_folder(tmp_path / 'src')
    assert prepare.main(['imagefolder', '--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'),
                         '--image-size', str(SIZE), '--workers', '1']) == 0
    fields = dict(source='arrayrecord', data_dir=str(tmp_path / 'out'), num_classes=3, global_batch_size=3)
    expected = {_file_crop(p).tobytes(): labels[p] for p in labels}
    for flip in (False, True):
        batches = _batches(8, random_flip=flip, seed=1, **fields)  # four epochs
        seen = []
        for batch in batches:
            for image, label in zip(_u8(batch['image']), batch['label']):
                if image.tobytes() in expected:
                    seen.append(False)
                else:
                    image = image[:, ::-1]
                    seen.append(True)
                assert expected[image.tobytes()] == label
        assert any(seen) == flip and (not flip or not all(seen))
    with pytest.raises(ValueError, match='config.data.num_classes'):
        _batches(1, **{**fields, 'num_classes': 2})


# ---------------------------------------------------------------- TFDS imagenet2012

WNIDS = ('n01440764', 'n01443537', 'n01484850')  # the first three ImageNet classes: labels 0, 1, 2


def _tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as archive:
        for name, data in members:
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
    """A fake ILSVRC2012 manual_dir (the archives' real layout: a train tar of per-class tars, 4 JPEGs
    each, one val image), built into TFDS imagenet2012 by the prepare command. Returns the paths and
    the expected crop per decoded JPEG."""
    pytest.importorskip('tensorflow_datasets')
    root = tmp_path_factory.mktemp('imagenet')
    rng = np.random.default_rng(3)
    expected, class_tars = {}, []
    for label, wnid in enumerate(WNIDS):
        files = []
        for i in range(4):
            data = _jpeg(rng.integers(0, 256, (20 + 9 * i, 45 - 5 * i, 3), dtype=np.uint8))
            files.append((f'{wnid}_{i}.JPEG', data))
            with Image.open(io.BytesIO(data)) as image:
                expected[reference_crop(image.convert('RGB'), SIZE).tobytes()] = label
        class_tars.append((f'{wnid}.tar', _tar(files)))
    (root / 'manual').mkdir()
    (root / 'manual' / 'ILSVRC2012_img_train.tar').write_bytes(_tar(class_tars))
    (root / 'manual' / 'ILSVRC2012_img_val.tar').write_bytes(
        _tar([('ILSVRC2012_val_00000001.JPEG', _jpeg(np.zeros((8, 8, 3), np.uint8)))]))
    tfds_dir = root / 'tfds'
    with pytest.raises(FileNotFoundError, match='not built.*jit_jax.data.prepare tfds'):
        _batches(1, source='tfds', data_dir=str(tfds_dir))  # training never builds it
    assert prepare.main(['tfds', '--manual-dir', str(root / 'manual'), '--tfds-data-dir', str(tfds_dir)]) == 0
    return root, tfds_dir, expected


def test_tfds_imagenet_through_grain_per_host_shards(imagenet):
    _, tfds_dir, expected = imagenet
    covered = []
    for process_index in range(2):  # 6 examples per host, 3 per local batch: two epochs
        batches = _batches(4, process_index=process_index, process_count=2, source='tfds',
                           data_dir=str(tfds_dir), global_batch_size=6)
        images = [(image.tobytes(), int(label)) for batch in batches
                  for image, label in zip(_u8(batch['image']), batch['label'])]
        for image, label in images:
            assert expected[image] == label  # the reference crop of the JPEG, with its synset's label
        assert sorted(images[:6]) == sorted(images[6:]) and len(set(images[:6])) == 6
        covered.append({image for image, _ in images})
    assert not covered[0] & covered[1] and covered[0] | covered[1] == set(expected)


def test_tfds_and_its_prepared_shards_give_the_same_batches_and_train(imagenet, tmp_path):
    """`prepare tfds --out` keeps TFDS's example order, so the two sources give equal batches (flips
    included); then one training step runs on the TFDS path."""
    root, tfds_dir, _ = imagenet
    out = tmp_path / 'shards'
    assert prepare.main(['tfds', '--manual-dir', str(root / 'manual'), '--tfds-data-dir', str(tfds_dir),
                         '--out', str(out), '--image-size', str(SIZE), '--num-shards', '2',
                         '--workers', '1']) == 0
    info = arrayrecord.read_info(out)
    assert info['num_classes'] == 1000 and info['class_names'][:3] == list(WNIDS)
    from_tfds = _batches(5, seed=2, random_flip=True, source='tfds', data_dir=str(tfds_dir))
    from_shards = _batches(5, seed=2, random_flip=True, source='arrayrecord', data_dir=str(out))
    for a, b in zip(from_tfds, from_shards):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])

    import jax
    from jit_jax import sharding, train
    from train_test import tiny_config

    config = tiny_config(mesh__data=1, mesh__fsdp=1)  # one device: the cheapest compile
    config.data.update(dict(source='tfds', name='imagenet2012', data_dir=str(tfds_dir), num_classes=1000,
                            num_workers=0))
    trainer = train.Trainer(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))
    data = pipeline.make_train_iterator(config.data, seed=config.seed)  # the training loop's call
    state = trainer.init()
    with jax.set_mesh(trainer.mesh):
        state, metrics = trainer.step_fn(state, sharding.global_batch(next(data), trainer.mesh))
    assert int(state['step']) == 1 and np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0
