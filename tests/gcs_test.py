"""Remote storage end to end against a real GCS emulator (tests/gcs_emulator.py) on 127.0.0.1.

Data is prepared straight into gs://bucket/data and training reads it from there; a run into
gs://bucket/run is SIGKILLed after a checkpoint and resumed from the bucket, and its final state must
equal an uninterrupted run's exactly; then `jit_jax.evaluate` scores that checkpoint with Inception weights
and reference statistics read from the bucket and writes its samples, reports and sweep table there.
Every file lands in the bucket (listed through the server's own API) and none in a local `gs:` folder,
which is what pathlib used to make of a gs:// path.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from gcs_emulator import gcs_bucket  # noqa: F401  (the fixture)
from train_test import REPO, _env

HELPER = REPO / 'tests' / 'gcs_emulator.py'
FIXED = 'warmup=1,ema=(0.9,0.99)'  # schedules independent of train.num_steps, which differs between runs


def _image_folder(root):
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / f'class{label}').mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f'class{label}' / f'{i}.png')


def _child(bucket, tmp_path, *args):
    env = dict(bucket.env, **{k: v for k, v in _env(1).items() if k in ('XLA_FLAGS', 'JAX_PLATFORMS',
                                                                         'TF_CPP_MIN_LOG_LEVEL', 'PYTHONPATH')})
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _train(bucket, tmp_path, workdir, steps, *flags):
    return _child(bucket, tmp_path, HELPER, 'train', workdir, steps, '--data_dir=gs://bucket/data',
                  f'--overrides={FIXED}', *flags)


def _ok(proc, timeout=600):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def test_train_kill_resume_and_evaluate_in_a_bucket(gcs_bucket, tmp_path):  # noqa: F811
    bucket = gcs_bucket
    _image_folder(tmp_path / 'images')
    _ok(_child(bucket, tmp_path, '-m', 'jit_jax.data.prepare', 'imagefolder', '--src', tmp_path / 'images',
               '--out', 'gs://bucket/data', '--image-size', 16, '--num-shards', 2, '--workers', 1))
    assert {'data/dataset_info.json', 'data/train-00000-of-00002.array_record'} <= set(bucket.objects('data/'))

    straight = _train(bucket, tmp_path, 'gs://bucket/straight', 6, f'--dump={tmp_path / "straight.npz"}')
    killed = _train(bucket, tmp_path, 'gs://bucket/run', 6, '--kill_at=5')
    out = killed.communicate(timeout=600)[0]
    assert killed.returncode == -signal.SIGKILL, out[-4000:]
    saved = {name.split('/')[2] for name in bucket.objects('run/checkpoints/')}
    assert '2' in saved and '6' not in saved, saved

    out = _ok(_train(bucket, tmp_path, 'gs://bucket/run', 6, '--sample', f'--dump={tmp_path / "resumed.npz"}',
                     f'--logdir_file={tmp_path / "logdir.txt"}'))
    assert 'resumed from gs://bucket/run/checkpoints at step' in out, out[-4000:]
    _ok(straight)

    with np.load(tmp_path / 'straight.npz') as a, np.load(tmp_path / 'resumed.npz') as b:
        assert sorted(a.files) == sorted(b.files) and "['step']" in a.files
        assert int(b["['step']"]) == 6
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    objects = set(bucket.objects('run/'))
    assert {'run/config.json', 'run/samples/step_0000006.png'} <= objects, sorted(objects)[:20]
    assert any(name.startswith('run/checkpoints/6/state/') for name in objects)
    assert any(name.startswith('run/checkpoints/6/data/') for name in objects)
    assert json.loads(bucket_bytes(bucket, 'run/config.json'))['train']['num_steps'] == 6
    assert (tmp_path / 'logdir.txt').read_text().split() == ['gs://bucket/run']  # TensorBoard writer's logdir
    rows = [json.loads(line) for line in bucket_bytes(bucket, 'run/metrics.jsonl').splitlines()]
    assert max(row['step'] for row in rows if 'loss' in row) == 6  # scalars of the resumed run in the bucket

    _check_evaluation(bucket, tmp_path)
    assert not (tmp_path / 'gs:').exists()


def _check_evaluation(bucket, tmp_path):
    """Weights and statistics in gs://bucket/fid; two CFG scales of the run's checkpoint, scored into the bucket."""
    out = _ok(_child(bucket, tmp_path, HELPER, 'evaluate', 'gs://bucket/run', 6, '--data_dir=gs://bucket/data',
                     f'--overrides={FIXED}', '--fid_dir=gs://bucket/fid', f'--logdir_file={tmp_path / "eval.txt"}'))
    reports = json.loads([line for line in out.splitlines() if line.startswith('reports ')][-1][len('reports '):])
    assert [r['run'] for r in reports] == ['ema1_cfg1', 'ema1_cfg2']
    assert {'fid/inception.npz', 'fid/ref.npz'} <= set(bucket.objects('fid/'))
    objects = set(bucket.objects('run/eval/'))
    assert not [name for name in objects if '.tmp' in name], sorted(objects)
    for report in reports:
        assert report['step'] == 6 and report['directory'] == f"gs://bucket/run/eval/{report['run']}"
        assert np.isfinite(report['fid']) and report['fid'] > 0 and report['inception_score_mean'] >= 1
        prefix = f"run/eval/{report['run']}/"
        assert json.loads(bucket_bytes(bucket, prefix + 'report.json'))['fid'] == report['fid']
        assert {f'{prefix}chunks/chunk_{i:05d}.npz' for i in range(3)} <= objects  # 10 samples, chunks of 4
        pngs = sorted(name for name in objects if name.startswith(prefix + 'images/'))
        assert len(pngs) == 10 and pngs[3].endswith('000003_class0003.png'), pngs
        with np.load(io.BytesIO(bucket_bytes(bucket, prefix + 'samples.npz', text=False))) as data:
            images, labels = data['images'], data['labels']
        assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.arange(10) % 10)
        png = Image.open(io.BytesIO(bucket_bytes(bucket, pngs[3], text=False)))
        np.testing.assert_array_equal(np.asarray(png), images[3])
    assert {'run/eval/sweep.md', 'run/eval/sweep.json'} <= objects
    table = bucket_bytes(bucket, 'run/eval/sweep.md')
    assert all(f"{r['fid']:.3f}" in table for r in reports), table
    logged = [json.loads(line) for line in bucket_bytes(bucket, 'run/eval/metrics.jsonl').splitlines()]
    assert [row['ema1_cfg2/fid'] for row in logged if 'ema1_cfg2/fid' in row] == [reports[1]['fid']]
    assert (tmp_path / 'eval.txt').read_text().split() == ['gs://bucket/run/eval']


def bucket_bytes(bucket, name, text=True):
    """An object's content, straight from the server's JSON API."""
    import urllib.parse
    import urllib.request

    url = f'{bucket.url}/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe="")}?alt=media'
    with urllib.request.urlopen(url, timeout=10) as response:
        data = response.read()
    return data.decode() if text else data
