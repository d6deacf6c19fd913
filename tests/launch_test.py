"""The launchers in launch/: every --dry-run prints the exact commands (checked here field by field),
and the control flow that needs a cluster (TPU restart after preemption, SLURM signal -> requeue) runs
against fake gcloud / srun / scontrol executables on PATH."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'


def _load(name):
    spec = importlib.util.spec_from_file_location(f'launch_{name}', LAUNCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake(bin_dir: pathlib.Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text('#!/bin/bash\n' + body)
    path.chmod(0o755)


POD = ['--name=pod', '--zone=us-central2-b', '--accelerator=v5p-64', '--repo=https://example.com/jit_jax.git',
       '--ref=abc123', '--config=configs/default.py:patch=8', '--workdir=gs://bucket/run']


def _gcloud_lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith('#')]


def test_tpu_pod_dry_run_prints_create_install_run(capsys):
    tpu_pod = _load('tpu_pod')
    assert tpu_pod.main(['up', *POD, '--spot', '--dry-run', '--', '--config.seed=3']) == 0
    create, install, run = _gcloud_lines(capsys.readouterr().out)
    assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod']
    assert {'--zone=us-central2-b', '--accelerator-type=v5p-64', '--spot'} <= set(create)
    for ssh in (install, run):
        assert ssh[4:6] == ['ssh', 'pod'] and '--worker=all' in ssh and '--zone=us-central2-b' in ssh
    install_cmd = install[-1].removeprefix('--command=')
    assert 'git clone https://example.com/jit_jax.git' in install_cmd and 'git checkout --quiet abc123' in install_cmd
    assert '"jax[tpu]"' in install_cmd
    run_cmd = run[-1].removeprefix('--command=')
    # The worker's command, unquoted once by the remote shell: the exact training invocation.
    inner = shlex.split(run_cmd.split('nohup bash -c ', 1)[1])[0]
    assert ('python -m jit_jax.main --config=configs/default.py:patch=8 --workdir=gs://bucket/run '
            '--config.seed=3') in inner
    assert '> ~/jit_jax_logs/$(hostname).log' in run_cmd and 'echo $? > ~/jit_jax_logs/$(hostname).exit' in inner


def test_tpu_pod_logs_and_delete_dry_runs(capsys):
    tpu_pod = _load('tpu_pod')
    assert tpu_pod.main(['logs', '--name=pod', '--zone=z', '--project=p', '--dry-run']) == 0
    (logs,) = _gcloud_lines(capsys.readouterr().out)
    assert logs[4:6] == ['ssh', 'pod'] and {'--worker=all', '--zone=z', '--project=p'} <= set(logs)
    assert logs[-1] == '--command=tail -n 20 ~/jit_jax_logs/$(hostname).log'  # every host's own log
    assert tpu_pod.main(['delete', '--name=pod', '--zone=z', '--dry-run']) == 0
    (delete,) = _gcloud_lines(capsys.readouterr().out)
    assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'pod']
    assert {'--zone=z', '--quiet'} <= set(delete)


def test_tpu_pod_refuses_a_local_workdir(capsys):
    tpu_pod = _load('tpu_pod')
    with pytest.raises(SystemExit):
        tpu_pod.main(['run', *POD[:-1], '--workdir=/tmp/run', '--dry-run'])
    assert 'gs://' in capsys.readouterr().err


def test_tpu_pod_watch_recreates_a_preempted_slice_and_resumes(tmp_path):
    """Fake gcloud: the slice is PREEMPTED at the first check, READY later; worker 0 reports exit 0
    only after the restart. watch must delete, recreate, reinstall, rerun, then stop and clean up."""
    log = tmp_path / 'gcloud.log'
    _fake(tmp_path / 'bin', 'gcloud', f'''echo "$*" >> {log}
case "$*" in
  *describe*) if [ -f {tmp_path}/checked ]; then echo READY; else touch {tmp_path}/checked; echo PREEMPTED; fi ;;
  *--worker=0*) [ "$(grep -c ' create ' {log})" -ge 2 ] && echo 0 ;;
esac
exit 0
''')
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}')
    result = subprocess.run([sys.executable, str(LAUNCH / 'tpu_pod.py'), 'watch', *POD, '--poll_seconds=0',
                             '--delete_when_done'], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    actions = [line.split()[3] + (' run' if 'jit_jax.main' in line else '') for line in log.read_text().splitlines()]
    assert actions == ['create', 'ssh', 'ssh run', 'describe', 'delete', 'create', 'ssh', 'ssh run',
                       'describe', 'ssh', 'describe', 'delete']
    assert 'PREEMPTED: recreating and resuming' in result.stdout


def _sbatch(env_extra: dict, *args: str, path: pathlib.Path | None = None, **popen):
    env = {**os.environ, 'GPUS_PER_NODE': '4', 'SLURM_JOB_ID': '4242', 'REPO_DIR': str(REPO), **env_extra}
    if path:
        env['PATH'] = f'{path}:{os.environ["PATH"]}'
    return subprocess.Popen(['bash', str(LAUNCH / 'gpu_slurm.sbatch'), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_slurm_script_dry_run_and_directives():
    header = (LAUNCH / 'gpu_slurm.sbatch').read_text()
    assert '#SBATCH --signal=B:TERM@120' in header.splitlines() and '#SBATCH --requeue' in header.splitlines()
    out, err = _sbatch({'CONFIG': 'configs/jit_l16_in256.py', 'WORKDIR': '/shared/runs/l16'},
                       '--dry-run', '--config.optim.blr=1e-4').communicate(timeout=30)
    srun = next(line for line in out.splitlines() if 'srun' in line)
    assert srun.startswith('JAX_LOCAL_DEVICE_IDS=0,1,2,3 ')
    assert shlex.split(srun.split('srun ', 1)[1]) == [
        '--ntasks-per-node=1', '--kill-on-bad-exit=1', f'{REPO}/.venv/bin/python', '-m', 'jit_jax.main',
        '--config=configs/jit_l16_in256.py', '--workdir=/shared/runs/l16', '--config.optim.blr=1e-4']
    assert 'scontrol requeue 4242' in out


@pytest.mark.parametrize('signalled', [True, False])
def test_slurm_script_forwards_sigterm_and_requeues(tmp_path, signalled):
    log = tmp_path / 'calls.log'
    # Fake srun: records its arguments; on SIGTERM (what jit_jax does: checkpoint, exit 0) it stops.
    _fake(tmp_path / 'bin', 'srun', f'''trap 'echo "srun got TERM" >> {log}; exit 0' TERM
echo "srun $*" >> {log}
[ "{int(signalled)}" = 1 ] || exit 0
while true; do sleep 0.05; done
''')
    _fake(tmp_path / 'bin', 'scontrol', f'echo "scontrol $*" >> {log}\n')
    proc = _sbatch({'CONFIG': 'configs/default.py', 'WORKDIR': str(tmp_path / 'run')}, path=tmp_path / 'bin')
    if signalled:
        deadline = time.time() + 30
        while not (log.exists() and 'srun ' in log.read_text()):
            assert time.time() < deadline, 'srun never started'
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what SLURM does 120 s before the time limit
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    calls = log.read_text().splitlines()
    assert calls[0].startswith('srun --ntasks-per-node=1') and f'--workdir={tmp_path / "run"}' in calls[0]
    if signalled:
        assert calls[1:] == ['srun got TERM', 'scontrol requeue 4242']
    else:
        assert calls[1:] == []  # a finished run is not requeued


def test_single_host_dry_run():
    out = subprocess.run(['bash', str(LAUNCH / 'single_host.sh'), '--dry-run', 'configs/default.py:steps=20',
                          'gs://bucket/one', '--config.seed=1'], env={**os.environ, 'LOG': '/tmp/x.log'},
                         capture_output=True, text=True, check=True).stdout
    assert shlex.split(out.split(' 2>&1')[0]) == ['python', '-m', 'jit_jax.main',
                                                   '--config=configs/default.py:steps=20',
                                                   '--workdir=gs://bucket/one', '--config.seed=1']
    assert out.strip().endswith('| tee -a /tmp/x.log')


GRID = ['--config', 'configs/default.py', '--grid', 'patch=4,8', '--grid', 'bottleneck=8,0']


def test_sweep_as_a_slurm_array_runs_each_cell(tmp_path, capsys):
    sweep = _load('sweep')
    cells = tmp_path / 'cells.txt'
    assert sweep.main([*GRID, '--workdir', 'gs://bucket/sweep', '--emit', 'slurm', '--cells_file', str(cells),
                       '--sbatch_flags=--nodes=2']) == 0
    submit = shlex.split(capsys.readouterr().out.strip())
    assert submit == ['sbatch', '--array=0-3', '--nodes=2', f'--export=ALL,CELLS={cells}',
                      str(LAUNCH / 'gpu_slurm.sbatch')]
    assert len(cells.read_text().splitlines()) == 4
    # Array task 2 is the third cell (patch=8, bottleneck=8).
    out, _ = _sbatch({'CELLS': str(cells), 'SLURM_ARRAY_TASK_ID': '2'}, '--dry-run').communicate(timeout=30)
    srun = shlex.split(next(line for line in out.splitlines() if 'srun' in line))
    assert srun[-2:] == ['--config=configs/default.py:patch=8,bottleneck=8',
                         '--workdir=gs://bucket/sweep/patch=8,bottleneck=8']


def test_sweep_for_tpu_slices_emits_valid_pod_commands(capsys):
    sweep, tpu_pod = _load('sweep'), _load('tpu_pod')
    assert sweep.main([*GRID, '--workdir', 'gs://bucket/sweep', '--emit', 'tpu', '--tpu_name', 'sw',
                       '--tpu_flags=--zone=z --repo=https://example.com/j.git', '--', '--config.seed=5']) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [line[3] for line in lines] == [f'--name=sw-{i}' for i in range(4)]
    assert lines[3][1] == str(LAUNCH / 'tpu_pod.py') and lines[3][2] == 'watch'
    assert lines[3][-2] == '--'
    assert tpu_pod.main([*lines[3][2:-2], '--dry-run', *lines[3][-2:]]) == 0  # the pod launcher accepts each line as is
    out = capsys.readouterr().out
    assert ('--config=configs/default.py:patch=8,bottleneck=0 --workdir=gs://bucket/sweep/patch=8,'
            'bottleneck=0 --config.seed=5') in out and '--name=sw-3' not in out and ' sw-3 ' in out


def test_sweep_dry_run_prints_and_neither_runs_nor_writes(tmp_path, capsys):
    sweep = _load('sweep')
    cells = tmp_path / 'cells.txt'
    assert sweep.main([*GRID, '--workdir', str(tmp_path / 'sw'), '--run', '--dry-run', '--python', 'false']) == 0
    argvs = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [a[:3] for a in argvs] == [['false', '-m', 'jit_jax.main']] * 4  # printed, not run ('false' would fail)
    assert argvs[1][3:] == ['--config=configs/default.py:patch=4,bottleneck=0', f'--workdir={tmp_path}/sw/patch=4,bottleneck=0']
    assert sweep.main([*GRID, '--workdir', 'gs://b/sw', '--emit', 'slurm', '--cells_file', str(cells),
                       '--dry-run', '--run']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'# {cells}:1: --config=configs/default.py:patch=4,bottleneck=8 --workdir=gs://b/sw/patch=4,bottleneck=8'
    assert out[-1].startswith('sbatch --array=0-3 ') and len(out) == 5
    assert not cells.exists() and not (tmp_path / 'sw').exists()


def test_sweep_collects_final_loss_and_fid(tmp_path, capsys):
    """Loss from TensorBoard events (patch=4) or metrics.jsonl (patch=8, preferred: TensorFlow-free and what
    every run writes), FID: the best of the reports in the layout jit_jax.evaluate writes (eval/<run>/)."""
    from clu import metric_writers

    from jit_jax import evaluate

    sweep = _load('sweep')
    grid = ['--grid', 'patch=4,8']
    writer = metric_writers.create_default_writer(str(tmp_path / 'patch=4'), asynchronous=False)
    for step, loss in ((10, 0.9), (20, 0.4)):
        writer.write_scalars(step, {'loss': loss, 'lr': 1e-4})
    writer.close()
    (tmp_path / 'patch=8').mkdir()
    (tmp_path / 'patch=8' / 'metrics.jsonl').write_text(
        '{"step": 10, "loss": 0.8}\n{"step": 10, "steps_per_sec": 2.0}\n{"step": 5, "loss": 0.95}\n')
    for run, fid in ((evaluate.Run('ema1', 1.5), 14.2), (evaluate.Run('ema2', 2.0), 12.345)):
        (tmp_path / 'patch=8' / 'eval' / run.name).mkdir(parents=True)
        (tmp_path / 'patch=8' / 'eval' / run.name / 'report.json').write_text(json.dumps({'run': run.name, 'fid': fid}))
    assert sweep.main(['--config', 'configs/default.py', '--workdir', str(tmp_path), *grid, '--collect']) == 0
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ['patch', 'step', 'loss', 'fid']
    assert rows[2:] == [['4', '20', '0.4000', '-'], ['8', '10', '0.8000', '12.35 (ema2_cfg2)']]
