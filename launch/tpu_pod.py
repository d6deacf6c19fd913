"""Train on a Cloud TPU VM pod slice: create it, install jit_jax on every worker, run, follow, delete,
and (`watch`) recreate a preempted slice and restart the run, which resumes from its last checkpoint.

    python launch/tpu_pod.py up --name my-pod --zone us-central2-b --accelerator v4-32 \\
        --repo https://github.com/ORG/jit_jax.git --ref COMMIT \\
        --config configs/jit_b16_in256.py --workdir gs://bucket/jit_b16 [--spot] [--dry-run] [-- main flags]

actions: create | install | run | logs | delete | up (create, install, run) | watch (up, then poll: a
preempted or vanished slice is deleted and brought up again; ends when worker 0 reports the run's exit)

Every worker runs the same `python -m jit_jax.main` (jax.distributed finds the coordinator, process
count and id by itself on TPU VMs); each writes its own log, ~/jit_jax_logs/<hostname>.log, and its
exit status next to it. The workdir must be shared by all hosts (gs://): checkpoints are written by all
of them together and a restarted run resumes from the latest complete one there. `--dry-run` prints
the exact gcloud commands instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

LOG_DIR = '~/jit_jax_logs'  # on each worker; expanded there
RESTART_STATES = ('PREEMPTED', 'TERMINATED', 'STOPPED')


class Gcloud:
    """Runs (or, for --dry-run, prints) gcloud commands for one TPU VM."""

    def __init__(self, args: argparse.Namespace, out=sys.stdout):
        self.args, self.out = args, out
        self.where = [f'--zone={args.zone}', *([f'--project={args.project}'] if args.project else [])]

    def __call__(self, *cmd: str, check: bool = True, capture: bool = False):
        cmd = ('gcloud', 'compute', 'tpus', 'tpu-vm', *cmd)
        if self.args.dry_run:
            print(shlex.join(cmd), file=self.out)
            return None
        return subprocess.run(cmd, check=check, text=True, capture_output=capture)

    def ssh(self, command: str, worker: str = 'all', check: bool = True, capture: bool = False):
        return self('ssh', self.args.name, *self.where, f'--worker={worker}', f'--command={command}',
                    check=check, capture=capture)


def worker_script(args: argparse.Namespace, extra: Sequence[str]) -> str:
    """The shell command each worker runs: training in the background, log and exit status per host."""
    main = shlex.join(['python', '-m', 'jit_jax.main', f'--config={args.config}',
                       f'--workdir={args.workdir}', *extra])
    body = (f'cd {args.repo_dir} && source {args.venv}/bin/activate && {main}; '
            f'echo $? > {LOG_DIR}/$(hostname).exit')
    # nohup + redirects: the run survives the ssh session; gcloud returns once every host started it.
    return (f'mkdir -p {LOG_DIR} && rm -f {LOG_DIR}/$(hostname).exit && '
            f'nohup bash -c {shlex.quote(body)} > {LOG_DIR}/$(hostname).log 2>&1 < /dev/null &')


def install_script(args: argparse.Namespace) -> str:
    """Clone (or update) the repository at --ref and install it with JAX for TPU, on each worker."""
    return (f'set -e; [ -d {args.repo_dir}/.git ] || git clone {shlex.quote(args.repo)} {args.repo_dir}; '
            f'cd {args.repo_dir} && git fetch --quiet origin && git checkout --quiet {shlex.quote(args.ref)}; '
            f'[ -d {args.venv} ] || python3 -m venv {args.venv}; '
            f'{args.venv}/bin/pip install --quiet -e . "jax[tpu]"')


def create(gcloud: Gcloud) -> None:
    a = gcloud.args
    gcloud('create', a.name, *gcloud.where, f'--accelerator-type={a.accelerator}', f'--version={a.version}',
           *(['--spot'] if a.spot else []))


def delete(gcloud: Gcloud) -> None:
    gcloud('delete', gcloud.args.name, *gcloud.where, '--quiet', check=False)


def up(gcloud: Gcloud, extra: Sequence[str]) -> None:
    create(gcloud)
    gcloud.ssh(install_script(gcloud.args))
    gcloud.ssh(worker_script(gcloud.args, extra))


def state(gcloud: Gcloud) -> str:
    """READY, PREEMPTED, ... or MISSING when the slice is gone."""
    result = gcloud('describe', gcloud.args.name, *gcloud.where, '--format=value(state)', check=False,
                    capture=True)
    if result is None:
        return 'READY'  # dry run
    return result.stdout.strip() if result.returncode == 0 else 'MISSING'


def watch(gcloud: Gcloud, extra: Sequence[str]) -> int:
    """Keeps the run going through preemptions; returns worker 0's exit status of jit_jax.main."""
    up(gcloud, extra)
    exit_status = f'cat {LOG_DIR}/$(hostname).exit 2>/dev/null'
    if gcloud.args.dry_run:
        print(f'# then every {gcloud.args.poll_seconds}s: describe; on {"/".join(RESTART_STATES)} or a '
              'vanished slice: delete, then create, install, run again (the run resumes from its checkpoint)',
              file=gcloud.out)
        state(gcloud)
        delete(gcloud)
        up(gcloud, extra)
        gcloud.ssh(exit_status, worker='0', check=False, capture=True)
        return 0
    while True:
        time.sleep(gcloud.args.poll_seconds)
        current = state(gcloud)
        if current in RESTART_STATES or current == 'MISSING':
            print(f'[tpu_pod] slice {gcloud.args.name} is {current}: recreating and resuming', flush=True)
            delete(gcloud)
            up(gcloud, extra)
            continue
        done = gcloud.ssh(exit_status, worker='0', check=False, capture=True).stdout.strip()
        # A preempted host also exits (0, after its checkpoint): only a slice still READY has finished.
        if done and state(gcloud) == 'READY':
            print(f'[tpu_pod] run finished with exit status {done}', flush=True)
            if gcloud.args.delete_when_done:
                delete(gcloud)
            return int(done)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('action', choices=('create', 'install', 'run', 'logs', 'delete', 'up', 'watch'))
    parser.add_argument('--name', required=True, help='TPU VM name')
    parser.add_argument('--zone', required=True)
    parser.add_argument('--project', default='', help="GCP project ('' = gcloud's default)")
    parser.add_argument('--accelerator', default='v4-32', help='accelerator type, e.g. v4-32, v5p-64')
    parser.add_argument('--version', default='tpu-ubuntu2204-base', help='TPU VM software version')
    parser.add_argument('--spot', action='store_true', help='spot capacity (can be preempted; use watch)')
    parser.add_argument('--repo', default='', help='git URL of jit_jax, cloned on every worker')
    parser.add_argument('--ref', default='main', help='commit / branch to check out (same on every host)')
    parser.add_argument('--repo_dir', default='~/jit_jax', help='checkout on the workers')
    parser.add_argument('--venv', default='~/jit_jax_venv', help='virtual environment on the workers')
    parser.add_argument('--config', default='', help='config file[:overrides] for jit_jax.main')
    parser.add_argument('--workdir', default='', help='gs:// folder shared by all hosts')
    parser.add_argument('--poll_seconds', type=int, default=300, help='watch: seconds between checks')
    parser.add_argument('--delete_when_done', action='store_true', help='watch: delete the slice at the end')
    parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                        help='print the gcloud commands instead of running them')
    args = parser.parse_args(argv)
    if args.action in ('install', 'up', 'watch') and not args.repo:
        parser.error(f'{args.action} needs --repo (the git URL cloned on every worker)')
    if args.action in ('run', 'up', 'watch'):
        if not args.config or not args.workdir:
            parser.error(f'{args.action} needs --config and --workdir')
        if not args.workdir.startswith('gs://'):
            parser.error(f'--workdir={args.workdir}: a pod needs a gs:// workdir that all hosts share '
                         '(a local path would be a different folder on every host)')
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    gcloud = Gcloud(args)
    actions = {
        'create': lambda: create(gcloud),
        'install': lambda: gcloud.ssh(install_script(args)),
        'run': lambda: gcloud.ssh(worker_script(args, extra)),
        'logs': lambda: gcloud.ssh(f'tail -n 20 {LOG_DIR}/$(hostname).log', check=False),
        'delete': lambda: delete(gcloud),
        'up': lambda: up(gcloud, extra),
    }
    if args.action == 'watch':
        return watch(gcloud, extra)
    actions[args.action]()
    return 0


if __name__ == '__main__':
    sys.exit(main())
