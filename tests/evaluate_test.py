"""python -m jit_jax.evaluate: resumable, chunk-independent sampling, FID reports, the sweep, periodic FID."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from train_test import REPO, TINY, tiny_config

from jit_jax import config_lib, evaluate, train
from jit_jax.fid import extractor as extractor_lib
from jit_jax.fid import frechet, reference, samples, weights


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny random Inception with fc, reference stats, and a 2-step tiny run (checkpoint at step 2) that
    has the periodic FID hook on."""
    root = tmp_path_factory.mktemp('eval')
    inception = weights.save(root / 'inception.npz', weights.random_weights(width=1 / 16, logits=True),
                             {'width': 1 / 16, 'source': 'random (test)'})
    ex = extractor_lib.load_inception(inception, batch_size=16)
    count, read = reference.open_source('synthetic', image_size=16, num_images=40, num_classes=10)
    stats = frechet.save_stats(root / 'ref.npz', *reference.compute_stats(ex, reference.batches(count, read, 16),
                                                                          count))
    out = {'root': root, 'workdir': root / 'run', 'inception': str(inception), 'stats': str(stats)}
    config = eval_config(out, every_steps=2, train_num_samples=12, chunk_size=8)
    config.train.ckpt_every_steps = 2
    hooks = evaluate.training_hooks(config)
    train.train_and_evaluate(config, out['workdir'], hooks=hooks)
    out['hook_result'] = hooks[0].get_last_callback_result()
    return out


def eval_config(trained, **fields):
    config = tiny_config('steps=2')
    with config.unlocked():
        config.eval.inception = trained['inception']
        config.eval.reference_stats = trained['stats']
        config.eval.inception_batch_size = 16
        for key, value in fields.items():
            config.eval[key] = value
    config_lib.validate(config)
    return config


def test_killed_evaluation_resumes_to_the_same_images_and_fid(trained, tmp_path, monkeypatch):
    config = eval_config(trained, num_samples=30, chunk_size=8, output='png,npz')
    whole = evaluate.evaluate(config, trained['workdir'])[0]
    directory = pathlib.Path(whole['directory'])
    with np.load(directory / 'samples.npz') as data:
        images, labels = data['images'], data['labels']
    assert images.shape == (30, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(30) % 10)  # class-balanced
    assert len(list((directory / 'images').glob('*.png'))) == 30
    assert np.isfinite(whole['fid']) and whole['fid'] > 0 and whole['inception_score_mean'] >= 1

    # Second workdir: the checkpoint, and a run that dies after writing two chunks.
    second = tmp_path / 'run'
    second.mkdir()
    (second / 'checkpoints').symlink_to(trained['workdir'] / 'checkpoints')
    real_save, calls = samples.save_chunk, []

    def dying_save(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt('killed')
        calls.append(args[1])
        return real_save(*args)

    monkeypatch.setattr(samples, 'save_chunk', dying_save)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(config, second)
    monkeypatch.setattr(samples, 'save_chunk', real_save)
    partial = second / 'eval' / directory.name
    assert sorted(p.name for p in (partial / 'chunks').glob('*.npz')) == ['chunk_00000.npz', 'chunk_00001.npz']
    resumed = evaluate.evaluate(config, second)[0]
    with np.load(partial / 'samples.npz') as data:
        np.testing.assert_array_equal(data['images'], images)
    assert resumed['fid'] == whole['fid']
    assert resumed['inception_score_mean'] == whole['inception_score_mean']


def test_sweep_shares_noise_across_chunkings_and_writes_the_table(trained, tmp_path):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').symlink_to(trained['workdir'] / 'checkpoints')
    config = eval_config(trained, num_samples=10, chunk_size=10, output='npz', weights='ema1,ema2',
                         cfg_scales=(1.0, 2.0))
    reports = evaluate.evaluate(config, workdir)
    assert [r['run'] for r in reports] == ['ema1_cfg1', 'ema1_cfg2', 'ema2_cfg1', 'ema2_cfg2']
    table = (workdir / 'eval' / 'sweep.md').read_text()
    for r in reports:
        assert f"{r['fid']:.3f}" in table
    # The same samples from 3-image chunks: the noise of sample i does not depend on the chunking.
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'checkpoints').symlink_to(trained['workdir'] / 'checkpoints')
    small = eval_config(trained, num_samples=10, chunk_size=3, output='npz', weights='ema2', cfg_scales=(2.0,))
    evaluate.evaluate(small, other)
    with np.load(workdir / 'eval' / 'ema2_cfg2' / 'samples.npz') as a, \
            np.load(other / 'eval' / 'ema2_cfg2' / 'samples.npz') as b:
        np.testing.assert_array_equal(a['images'], b['images'])


def test_periodic_fid_hook_during_training(trained):
    """train_and_evaluate(hooks=training_hooks(config)) ran the FID at step 2 (the fixture's run)."""
    result = trained['hook_result']
    assert np.isfinite(result['fid']) and result['fid'] > 0 and result['inception_score_mean'] >= 1
    # ... and logged it through the run's own writer (every writer path appends scalars to metrics.jsonl).
    logged = [json.loads(line) for line in (trained['workdir'] / 'metrics.jsonl').read_text().splitlines()]
    assert [row['fid_12'] for row in logged if 'fid_12' in row] == [pytest.approx(result['fid'])]


def test_eval_config_errors_name_the_field():
    config = tiny_config()
    with config.unlocked():
        config.eval.every_steps = 10
    with pytest.raises(ValueError, match='config.eval.every_steps=10'):
        config_lib.validate(config)
    config = tiny_config()
    config.eval.weights = 'ema1,emma'
    with pytest.raises(ValueError, match=r"config.eval.weights='ema1,emma'"):
        config_lib.validate(config)
    config = tiny_config()
    config.eval.output = 'jpg'
    with pytest.raises(ValueError, match='config.eval.output'):
        config_lib.validate(config)


def test_command_line_evaluates_a_workdir(trained, tmp_path):
    """python -m jit_jax.evaluate: the same flags and start-up as training, one JSON line of reports."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').symlink_to(trained['workdir'] / 'checkpoints')
    flags = {'eval.inception': trained['inception'], 'eval.reference_stats': trained['stats'],
             'eval.inception_batch_size': 16, 'eval.num_samples': 10, 'eval.chunk_size': 8, 'eval.output': 'npz'}
    cmd = [sys.executable, '-m', 'jit_jax.evaluate', f"--config={REPO / 'configs' / 'default.py'}:{TINY},steps=2",
           f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in flags.items())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert report['run'] == f'ema1_cfg{tiny_config().sampler.cfg_scale:g}'  # config.sampler's CFG, EMA 1
    assert np.isfinite(report['fid']) and report['fid'] > 0
    with np.load(pathlib.Path(report['directory']) / 'samples.npz') as data:
        assert data['images'].shape == (10, 16, 16, 3)
