"""The training system: exact resume, multi-device equality, accumulation, failures that keep checkpoints."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jit_jax import checkpoint as ckpt_lib
from jit_jax import config_lib, sharding, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# A model small enough to compile and step in seconds on 2 CPU cores; everything else is configs/default.py.
TINY = ('hidden=32,depth=2,heads=2,bottleneck=8,ctx_len=2,ctx_start=1,img_size=16,batch=8,sampling_steps=3,'
        'eval.classifier=')


def tiny_config(extra: str = '', **fields):
    config = config_lib.load(f"{REPO / 'configs' / 'default.py'}:{','.join(filter(None, [TINY, extra]))}")
    config.train.log_every_steps = 1
    config.train.sample_every_steps = 0
    config.data.read_threads = 1
    for path, value in fields.items():
        node = config
        *parents, leaf = path.split('__')
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def restore_state(config, workdir, step):
    trainer = train.Trainer(config)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(os.fspath(workdir), 'checkpoints'))  # gs:// too
    try:
        return checkpointer.restore(step, ckpt_lib.abstract_with_shardings(
            trainer.abstract_state, trainer.state_shardings), None)
    finally:
        checkpointer.close()


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_resume_continues_bit_exactly(tmp_path):
    """k steps, stop, resume, k steps == 2k steps uninterrupted (params, moments, EMA, data order)."""
    train.train_and_evaluate(tiny_config(train__num_steps=4, train__ckpt_every_steps=2), tmp_path / 'straight')
    train.train_and_evaluate(tiny_config(train__num_steps=2, train__ckpt_every_steps=2), tmp_path / 'resumed')
    result = train.train_and_evaluate(tiny_config(train__num_steps=4, train__ckpt_every_steps=2),
                                      tmp_path / 'resumed')
    assert np.isfinite(result['loss'])
    config = tiny_config()
    straight, resumed = restore_state(config, tmp_path / 'straight', 4), restore_state(config, tmp_path / 'resumed', 4)
    assert int(resumed['step']) == 4
    assert_trees_equal(straight, resumed)
    before = restore_state(config, tmp_path / 'straight', 2)
    assert not np.array_equal(before['params']['final_layer']['linear']['kernel'],
                              straight['params']['final_layer']['linear']['kernel']), 'training moved the weights'


def _two_steps(config, mesh):
    trainer = train.Trainer(config, mesh=mesh)
    state = trainer.init()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        local = {'image': rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                 'label': rng.integers(0, 10, 8).astype(np.int32)}
        with jax.set_mesh(trainer.mesh):
            state, metrics = trainer.step_fn(state, sharding.global_batch(local, trainer.mesh))
        losses.append(float(metrics['loss']))
    return trainer, jax.device_get(state), losses


@pytest.mark.parametrize('mode,data,fsdp', [('replicate', -1, 1), ('fsdp', 2, 4), ('fsdp', 1, 8)])
def test_eight_devices_match_one(mode, data, fsdp, monkeypatch):
    monkeypatch.setattr(sharding, 'MIN_SHARDED_SIZE', 256)  # the tiny model's arrays are all small
    assert jax.device_count() == 8, 'tests run with 8 fake CPU devices (tests/conftest.py)'
    config = tiny_config(mesh__data=data, mesh__fsdp=fsdp, mesh__param_sharding=mode)
    one_device = tiny_config(mesh__data=1, mesh__fsdp=1, mesh__param_sharding=mode)
    _, single, single_losses = _two_steps(one_device, sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]))
    trainer, multi, multi_losses = _two_steps(config, None)
    assert trainer.mesh.devices.size == 8
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(multi['params']), jax.tree.leaves(single['params'])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, trainer.state_shardings['params']))
    if mode == 'fsdp':
        assert any('fsdp' in spec for spec in specs), 'large parameters are split over the fsdp axis'
    else:
        assert all(spec == jax.sharding.PartitionSpec() for spec in specs)


def test_gradient_accumulation_matches_one_big_batch():
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
    _, one, losses_one = _two_steps(tiny_config(), mesh)
    _, four, losses_four = _two_steps(tiny_config(optim__grad_accum_steps=4), mesh)
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(four['params']), jax.tree.leaves(one['params'])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ema_copies_follow_their_decays():
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
    trainer = train.Trainer(tiny_config(optim__ema_decays=(0.5, 0.0)), mesh=mesh)
    state = trainer.init()
    init = jax.device_get(state)
    _, after, _ = _two_steps(tiny_config(optim__ema_decays=(0.5, 0.0)), mesh)
    assert_trees_equal(after['ema']['ema2'], after['params'])  # decay 0: the EMA is the weights
    # decay 0.5 twice from the initial weights: ema = 0.25 init + 0.25 p1 + 0.5 p2; check via a leaf that moved
    leaf = ('final_layer', 'linear', 'bias')
    get = lambda tree: tree[leaf[0]][leaf[1]][leaf[2]]  # noqa: E731
    p2, e1 = get(after['params']), get(after['ema']['ema1'])
    assert np.all(np.abs(e1 - get(init['params'])) <= np.abs(p2 - get(init['params'])) + 1e-7)
    assert not np.allclose(e1, p2)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    train.train_and_evaluate(tiny_config(train__num_steps=2, train__ckpt_every_steps=1), tmp_path)
    # Resume with an absurd learning rate: the weights overflow float32 within a step or two.
    config = tiny_config(optim__lr=1e30, optim__warmup_steps=0, train__num_steps=20, train__ckpt_every_steps=1)
    with pytest.raises(FloatingPointError, match=r'non-finite loss at step (\d+).*last good checkpoint') as info:
        train.train_and_evaluate(config, tmp_path)
    bad = int(info.value.args[0].split('step ')[1].split(';')[0])
    steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert bad > 2 and steps and max(steps) < bad, (steps, bad)
    state = restore_state(config, tmp_path, max(steps))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state['params']))


def test_workdir_of_another_architecture_is_refused(tmp_path):
    train.train_and_evaluate(tiny_config(train__num_steps=1, train__ckpt_every_steps=1), tmp_path)
    with pytest.raises(ValueError, match=r'checkpoint at .*checkpoints/1 holds another architecture.*hidden_size'):
        train.train_and_evaluate(tiny_config(model__hidden_size=48, train__num_steps=2), tmp_path)
    assert (tmp_path / 'checkpoints' / '1').is_dir() and not (tmp_path / 'checkpoints' / '2').exists()


def _main_command(workdir, extra_flags=(), overrides=''):
    return [sys.executable, '-m', 'jit_jax.main', f'--config={REPO}/configs/default.py:{TINY}{overrides}',
            f'--workdir={workdir}', '--config.data.read_threads=1', *extra_flags]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
    env['PYTHONPATH'] = str(REPO)
    return env


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    flags = ['--config.train.num_steps=100000', '--config.train.ckpt_every_steps=100000',
             '--config.train.sample_every_steps=0', '--config.train.log_every_steps=1']
    proc = subprocess.Popen(_main_command(tmp_path, flags), env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + 240, ''
    for line in proc.stdout:
        seen += line
        if 'loss=' in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    seen += rest
    assert proc.returncode == 0, seen[-3000:]
    assert 'preempted at step' in seen
    steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100000


def test_two_processes_train_end_to_end(tmp_path):
    """Two local processes (2 CPU devices each) joined by jax.distributed run the default config's loop."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    flags = ['--config.train.num_steps=3', '--config.train.ckpt_every_steps=3', '--config.train.log_every_steps=1',
             '--config.train.sample_every_steps=3', '--config.sampler.num_images=8',
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
    procs = [subprocess.Popen(_main_command(tmp_path, flags + [f'--process_id={i}']), env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=420)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert 'JAX processes 2, local devices 2, global devices 4' in outputs[0]
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['3']
    assert (tmp_path / 'samples' / 'step_0000003.png').is_file()
    config = tiny_config()
    state = restore_state(config, tmp_path, 3)
    assert int(state['step']) == 3
    data_files = sorted(p.name for p in (tmp_path / 'checkpoints' / '3' / 'data').iterdir())
    assert len([f for f in data_files if 'process' in f]) == 2, data_files  # one iterator state per host


@pytest.mark.parametrize('env,multi', [
    ({}, False), ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False), ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'}, True),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, False), ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True)])
def test_jax_distributed_starts_only_for_several_processes(env, multi):
    from jit_jax import main as main_lib

    assert main_lib.multi_host_environment(env) is multi
