"""Preemption on many hosts: two local processes joined by jax.distributed, SIGTERM sent to one of them.

JAX's preemption service (its own SIGTERM notifier, started by jax.distributed.initialize) tells the other
process; both stop at the same step, write one complete checkpoint together, exit 0, and the run resumes
from it exactly.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading

from train_test import REPO, TINY, _env, assert_trees_equal, restore_state, tiny_config

# warmup and EMA decays fixed: in configs/default.py they follow train.num_steps, which differs between
# the preempted run and its references.
FIXED = ',warmup=1,ema=(0.9,0.99)'


def _two_processes(workdir, flags):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    common = [f'--config={REPO}/configs/default.py:{TINY}{FIXED}', f'--workdir={workdir}',
              '--config.data.read_threads=1', '--config.train.sample_every_steps=0',
              '--config.train.log_every_steps=1', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              *flags]
    return [subprocess.Popen([sys.executable, '-m', 'jit_jax.main', *common, f'--process_id={i}'], env=_env(2),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
            for i in range(2)]


def _finish(procs, timeout=300):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    preempted, straight = tmp_path / 'preempted', tmp_path / 'straight'
    procs = _two_processes(preempted, ['--config.train.num_steps=100000', '--config.train.ckpt_every_steps=100000'])
    # Read process 1's output live; SIGTERM it (only it) once it has logged two training steps.
    seen, started = [], threading.Event()

    def read():
        for line in procs[1].stdout:
            seen.append(line)
            if sum('loss=' in s for s in seen) >= 2:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(240), ''.join(seen)[-3000:]
    procs[1].send_signal(signal.SIGTERM)
    out0 = procs[0].communicate(timeout=240)[0]
    procs[1].wait(timeout=240)
    reader.join(timeout=10)
    out1 = ''.join(seen)
    for p, out in zip(procs, (out0, out1)):
        assert p.returncode == 0, out[-3000:]
    stops = [int(re.search(r'preempted at step (\d+)', out).group(1)) for out in (out0, out1)]
    assert stops[0] == stops[1], stops
    stop = stops[0]
    assert 2 <= stop < 100000, stop
    assert _steps(preempted) == [stop]  # one complete checkpoint, at the agreed step
    assert len([f for f in (preempted / 'checkpoints' / str(stop) / 'data').iterdir() if 'process' in f.name]) == 2

    # Resume to stop + 2 while an uninterrupted reference run goes there too, checkpointing every step so
    # that its state at the stop step is kept as well.
    resumed = _two_processes(preempted, [f'--config.train.num_steps={stop + 2}',
                                         '--config.train.ckpt_every_steps=100000'])
    reference = _two_processes(straight, [f'--config.train.num_steps={stop + 2}',
                                          '--config.train.ckpt_every_steps=1', '--config.train.keep_checkpoints=100'])
    outputs = _finish(resumed)
    assert f'resumed from {preempted}/checkpoints at step {stop}' in outputs[0], outputs[0][-3000:]
    _finish(reference)
    config = tiny_config(FIXED.lstrip(','))
    assert_trees_equal(restore_state(config, preempted, stop), restore_state(config, straight, stop))
    assert_trees_equal(restore_state(config, preempted, stop + 2), restore_state(config, straight, stop + 2))
