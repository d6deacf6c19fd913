"""What a restarted or re-configured run does with the checkpoints it finds, and the loop's options:
a damaged latest checkpoint, runs that cannot continue a checkpoint, fine-tuning from converted
weights, ckpt_every_steps=0, the profiler trace, a non-finite gradient norm."""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
import pytest
from flax import nnx

from jit_jax import checkpoint as ckpt_lib
from jit_jax import config_lib, convert, train
from jit_jax import model as model_lib
from train_test import assert_trees_equal, restore_state, tiny_config

FIXED = 'warmup=1,ema=(0.9,0.99)'  # schedules that do not follow train.num_steps


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _damage(step_dir):
    for path in (step_dir / 'state').rglob('*'):
        if path.is_file():
            path.write_bytes(b'not a checkpoint')


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = lambda n: tiny_config(FIXED, train__num_steps=n, train__ckpt_every_steps=1, train__keep_checkpoints=5)  # noqa: E731
    train.train_and_evaluate(config(2), tmp_path / 'run')
    train.train_and_evaluate(config(3), tmp_path / 'straight')
    _damage(tmp_path / 'run' / 'checkpoints' / '2')
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config(3), tmp_path / 'run')
    assert any('checkpoints/2 does not restore' in r.getMessage() for r in caplog.records), caplog.text
    # Resumed from step 1: steps 2 and 3 were trained again, identically to the uninterrupted run.
    assert_trees_equal(restore_state(config(3), tmp_path / 'run', 3), restore_state(config(3), tmp_path / 'straight', 3))
    for step in _steps(tmp_path / 'run'):
        _damage(tmp_path / 'run' / 'checkpoints' / str(step))
    with pytest.raises(RuntimeError, match=r'no checkpoint in .*checkpoints restores \(step 3: .*step 2: .*step 1: '):
        train.train_and_evaluate(config(4), tmp_path / 'run')


@pytest.mark.parametrize('field,change', [
    ('data.global_batch_size', dict(data__global_batch_size=16)),
    ('optim.grad_clip > 0', dict(optim__grad_clip=1.0)),
    ('len(optim.ema_decays)', dict(optim__ema_decays=(0.9,))),
])
def test_a_run_that_cannot_continue_the_checkpoint_is_refused_naming_the_field(tmp_path, field, change):
    train.train_and_evaluate(tiny_config(train__num_steps=1, train__ckpt_every_steps=1), tmp_path)
    config = tiny_config(train__num_steps=2, **change)
    with pytest.raises(ValueError, match=rf"checkpoint at .*checkpoints/1 cannot be continued .*{re.escape(field)}: checkpoint"):
        train.train_and_evaluate(config, tmp_path)
    assert _steps(tmp_path) == [1]


def test_resume_fields_compare_process_and_worker_counts():
    config = tiny_config()
    meta = {'resume': ckpt_lib.resume_fields(config, process_count=2)}
    ckpt_lib.check_resumable(meta, config, 2, 'DIR', 5)
    with pytest.raises(ValueError, match=r'DIR/5 cannot be continued .*process_count: checkpoint 2 vs now 1'):
        ckpt_lib.check_resumable(meta, config, 1, 'DIR', 5)
    other = tiny_config(data__num_workers=3)
    with pytest.raises(ValueError, match=r'data.num_workers: checkpoint 0 vs now 3'):
        ckpt_lib.check_resumable(meta, other, 2, 'DIR', 5)
    ckpt_lib.check_resumable({}, other, 1, 'DIR', 5)  # checkpoints written before these fields: no check


def _torch_state_dict(model_config, seed):
    model = model_lib.JiT(model_config, rngs=nnx.Rngs(params=seed))
    flat = {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    state_dict = convert.params_to_torch(flat, model_config)
    state_dict['pos_embed'] = np.zeros((1, model_config.num_patches, model_config.hidden_size), np.float32)
    return state_dict, nnx.to_pure_dict(nnx.state(model))


def test_init_from_converted_weights(tmp_path):
    config = tiny_config(FIXED, train__num_steps=1, train__ckpt_every_steps=1, optim__lr=1e-12)
    model_config = config_lib.model_config(config)
    weights, params = _torch_state_dict(model_config, seed=7)
    ema_weights, ema1 = _torch_state_dict(model_config, seed=8)
    out = tmp_path / 'converted'
    assert convert.convert_checkpoint({'model': weights, 'model_ema1': ema_weights}, out,
                                      model_config=model_config) == ['ema1', 'params']
    config.train.init_from = str(out)

    state = jax.device_get(train.Trainer(config).init_from(str(out)))
    for got, want in (('params', params), ('ema1', ema1), ('ema2', params)):  # no ema2 converted: the weights
        tree = state['params'] if got == 'params' else state['ema'][got]
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f'{got}{jax.tree_util.keystr(path)}')
    assert int(state['step']) == 0 and all(not np.any(m) for m in jax.tree.leaves(state['opt'][0].mu))

    train.train_and_evaluate(config, tmp_path / 'finetune')  # a step at lr 1e-12 keeps the weights
    after = restore_state(config, tmp_path / 'finetune', 1)
    kernel = ('final_layer', 'linear', 'kernel')
    get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]]  # noqa: E731
    np.testing.assert_allclose(get(after['params']), get(params), atol=1e-6)

    other = tiny_config(FIXED, model__hidden_size=48, train__num_steps=1)
    other.train.init_from = str(out)
    with pytest.raises(ValueError, match=r'config.train.init_from=.*converted.* another architecture '
                                         r'\(hidden_size: checkpoint 32 vs config 48\)'):
        train.train_and_evaluate(other, tmp_path / 'other')


def test_ckpt_every_zero_writes_no_checkpoint_and_profile_steps_write_a_trace(tmp_path):
    config = tiny_config(train__num_steps=3, train__ckpt_every_steps=0, train__profile_steps=1)
    result = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(result['loss'])
    assert _steps(tmp_path) == []
    traces = list((tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb'))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, list(tmp_path.rglob('*'))


def test_non_finite_gradient_norm_stops_like_a_non_finite_loss(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(tmp_path)
    try:
        acc = train._accumulate(train._empty_metrics(), {'loss': 1.0, 'grad_norm': 2.0}, jax.numpy.int32(0))
        train.raise_if_not_finite(jax.device_get(acc), checkpointer)  # finite: nothing happens
        acc = train._accumulate(acc, {'loss': 1.0, 'grad_norm': np.inf}, jax.numpy.int32(1))
        acc = train._accumulate(acc, {'loss': np.nan, 'grad_norm': np.nan}, jax.numpy.int32(2))
        with pytest.raises(FloatingPointError, match=r'non-finite gradient norm \(the loss was still finite\) '
                                                     r'at step 2; .*last good checkpoint \(step None\)'):
            train.raise_if_not_finite(jax.device_get(acc), checkpointer)
        acc = train._accumulate(train._empty_metrics(), {'loss': np.nan, 'grad_norm': np.inf}, jax.numpy.int32(4))
        with pytest.raises(FloatingPointError, match=r'non-finite loss at step 5'):
            train.raise_if_not_finite(jax.device_get(acc), checkpointer)
    finally:
        checkpointer.close()
