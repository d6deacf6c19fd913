"""Remote storage end to end against a real GCS emulator (tests/gcs_emulator.py) on 127.0.0.1.

Data is prepared straight into gs://bucket/data and training reads it from there; a run into
gs://bucket/run is SIGKILLed after a checkpoint and resumed from the bucket, and its final state must
equal an uninterrupted run's exactly. Every file lands in the bucket (listed through the server's own
API) and none in a local `gs:` folder, which is what pathlib used to make of a gs:// path.
"""

from __future__ import annotations

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


def _ok(proc, timeout=300):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def test_train_kill_resume_in_a_bucket_exactly(gcs_bucket, tmp_path):  # noqa: F811
    bucket = gcs_bucket
    _image_folder(tmp_path / 'images')
    _ok(_child(bucket, tmp_path, '-m', 'jit_jax.data.prepare', 'imagefolder', '--src', tmp_path / 'images',
               '--out', 'gs://bucket/data', '--image-size', 16, '--num-shards', 2, '--workers', 1))
    assert {'data/dataset_info.json', 'data/train-00000-of-00002.array_record'} <= set(bucket.objects('data/'))

    straight = _train(bucket, tmp_path, 'gs://bucket/straight', 6, f'--dump={tmp_path / "straight.npz"}')
    killed = _train(bucket, tmp_path, 'gs://bucket/run', 6, '--kill_at=5')
    out = killed.communicate(timeout=300)[0]
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
    assert json.loads(bucket_text(bucket, 'run/config.json'))['train']['num_steps'] == 6
    assert (tmp_path / 'logdir.txt').read_text() == 'gs://bucket/run'  # TensorBoard writer got the bucket path
    assert not (tmp_path / 'gs:').exists()


def bucket_text(bucket, name):
    import urllib.parse
    import urllib.request

    url = f'{bucket.url}/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe="")}?alt=media'
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
