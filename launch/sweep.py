"""Expand a grid of config overrides into one training run per cell; print, run or submit them, and
collect the cells' final metrics into one table.

    python launch/sweep.py --config configs/default.py --workdir /tmp/sweep \\
        --grid patch=4,8 --grid bottleneck=8,16,0 [--set cfg=2.0] [--run] [-- --extra_main_flag=...]
    ... --emit slurm [--cells_file cells.txt] [--run]   # one SLURM array job, one task per cell
    ... --emit tpu --tpu_flags='--zone=Z --repo=URL --ref=REF --spot' [--run]  # one TPU slice per cell
    ... --collect                                       # table of final loss (and FID) per cell

Each cell becomes `--config configs/default.py:<base overrides>,patch=4,bottleneck=8` with its own
workdir `<workdir>/patch=4,bottleneck=8`, so cells resume independently and never share checkpoints.
The overrides use the same `key=value` syntax and aliases as `--config file.py:<arg>`
(jit_jax.config_lib.apply_overrides). Before anything is printed or run, every cell's config is built
and validated, so a typo in the grid fails here rather than an hour into the sweep.

`--emit commands` (default) prints one `python -m jit_jax.main` per cell; `--run` runs them one after
another here. `--emit slurm` writes the cells' arguments, one shell-quoted line each, to --cells_file and
prints the `sbatch --array` command for launch/gpu_slurm.sbatch (`--run` submits it). `--emit tpu`
prints one `launch/tpu_pod.py watch` per cell, each on its own slice named <tpu_name>-<cell index>
(`--run` starts them one after another). `--dry-run` prints and never writes or runs anything.

`--collect` reads each cell's workdir: the last `loss` scalar of its metrics.jsonl (which every run
writes, with or without TensorFlow; TensorBoard event files otherwise) and the lowest FID among the
`eval/<weights>_cfg<scale>/report.json` files that `python -m jit_jax.evaluate` writes there, with the
run it came from; it prints one Markdown table (missing values: -).
Workdirs may be local or gs:// (etils.epath / tf.io.gfile); no pathlib on them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import json
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: make jit_jax importable
    sys.path.insert(0, str(REPO))

from jit_jax import config_lib  # noqa: E402


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['patch=4,8', 'ema=(0.99,0.999),(0.9,0.99)'] -> [('patch', ['4', '8']), ('ema', [...])]."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, values = spec.partition('=')
        key = key.strip()
        if not eq or not key:
            raise ValueError(f'--grid {spec!r}: expected key=value1,value2,...')
        if key in (k for k, _ in axes):
            raise ValueError(f'--grid key {key!r} given twice')
        cells = config_lib.split_top_level(values)
        if not cells:
            raise ValueError(f'--grid {spec!r}: no values')
        axes.append((key, cells))
    return axes


def expand(specs: Sequence[str]) -> list[list[tuple[str, str]]]:
    """The cartesian product of the grid axes, in order (last axis fastest), as override pairs per cell."""
    axes = parse_grid(specs)
    keys = [key for key, _ in axes]
    return [list(zip(keys, values)) for values in itertools.product(*(values for _, values in axes))]


def cell_name(pairs: Sequence[tuple[str, str]]) -> str:
    """A workdir name that reads like the overrides; characters unsafe in paths become '_'."""
    if not pairs:
        return 'base'
    return re.sub(r'[^A-Za-z0-9._=,+-]', '_', ','.join(f'{k}={v}' for k, v in pairs))


def commands(config: str, workdir: str, grid: Sequence[str], base_overrides: str = '',
             extra_args: Sequence[str] = (), python: str = sys.executable) -> list[list[str]]:
    """One `python -m jit_jax.main` argv per grid cell."""
    base_pairs = config_lib.parse_overrides(base_overrides)
    argvs = []
    for pairs in expand(grid):
        overrides = ','.join(f'{k}={v}' for k, v in [*base_pairs, *pairs])
        spec = f'{config}:{overrides}' if overrides else config
        argvs.append([python, '-m', 'jit_jax.main', f'--config={spec}',
                      f'--workdir={cell_workdir(workdir, pairs)}', *extra_args])
    return argvs


def cell_workdir(workdir: str, pairs: Sequence[tuple[str, str]]) -> str:
    """<workdir>/<cell name>, joined as a string so gs://bucket/x keeps its double slash."""
    return f'{workdir.rstrip("/")}/{cell_name(pairs)}'


def main_args(argv: Sequence[str]) -> list[str]:
    """The jit_jax.main arguments of a command from commands() (everything after `-m jit_jax.main`)."""
    return list(argv[3:])


def slurm_submit(argvs: Sequence[Sequence[str]], cells_file: str, sbatch_flags: str = '') -> list[str]:
    """The sbatch command of an array job running line i of cells_file as task i."""
    return ['sbatch', f'--array=0-{len(argvs) - 1}', *shlex.split(sbatch_flags),
            f'--export=ALL,CELLS={cells_file}', str(REPO / 'launch' / 'gpu_slurm.sbatch')]


def tpu_commands(argvs: Sequence[Sequence[str]], tpu_name: str, tpu_flags: str,
                 python: str = sys.executable) -> list[list[str]]:
    """One `tpu_pod.py watch` per cell: its own slice, restarted after preemption until it finishes."""
    out = []
    for i, argv in enumerate(argvs):
        config, workdir, *extra = main_args(argv)
        out.append([python, str(REPO / 'launch' / 'tpu_pod.py'), 'watch', f'--name={tpu_name}-{i}',
                    *shlex.split(tpu_flags), config, workdir, '--delete_when_done',
                    *(['--', *extra] if extra else [])])
    return out


def final_loss(workdir: str) -> tuple[int, float] | None:
    """(step, loss) of the last `loss` scalar of workdir's metrics.jsonl (else its TensorBoard events), or None."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    from jit_jax import writers  # pylint: disable=import-outside-toplevel

    jsonl = epath.Path(workdir) / writers.METRICS_FILE
    if jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        losses = [(int(row['step']), float(row['loss'])) for row in rows if 'loss' in row]
        return max(losses, key=lambda pair: pair[0]) if losses else None
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel  (tf.io.gfile reads gs:// too)
    except ImportError:
        return None
    last = None
    for path in sorted(tf.io.gfile.glob(f'{workdir.rstrip("/")}/events.out.tfevents.*')):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == 'loss':
                    number = (float(tf.make_ndarray(value.tensor)) if value.HasField('tensor')
                              else value.simple_value)
                    if last is None or event.step >= last[0]:
                        last = (int(event.step), number)
    return last


def report_fid(workdir: str) -> tuple[float, str] | None:
    """(fid, run) of the lowest FID among workdir/eval/*/report.json (jit_jax.evaluate's reports), or None."""
    from etils import epath  # pylint: disable=import-outside-toplevel

    best = None
    for path in sorted(epath.Path(workdir).glob('eval/*/report.json')):
        report = json.loads(path.read_text())
        if 'fid' in report and (best is None or report['fid'] < best[0]):
            best = (float(report['fid']), str(report.get('run', path.parent.name)))
    return best


def collect(workdir: str, grid: Sequence[str]) -> str:
    """One Markdown row per cell: the grid values, the last step and loss logged, and the FID."""
    cells = expand(grid)
    keys = [key for key, _ in cells[0]] if cells and cells[0] else ['cell']
    lines = ['| ' + ' | '.join([*keys, 'step', 'loss', 'fid']) + ' |', '|' + '---|' * (len(keys) + 3)]
    for pairs in cells:
        cell = cell_workdir(workdir, pairs)
        loss, fid = final_loss(cell), report_fid(cell)
        values = [v for _, v in pairs] or ['base']
        values += [str(loss[0]), f'{loss[1]:.4f}'] if loss else ['-', '-']
        values.append(f'{fid[0]:.2f} ({fid[1]})' if fid is not None else '-')
        lines.append('| ' + ' | '.join(values) + ' |')
    return '\n'.join(lines)


def check(argvs: Sequence[Sequence[str]]) -> None:
    """Build and validate every cell's config (config_lib.load: device-independent checks only)."""
    for argv in argvs:
        spec = next(a for a in argv if a.startswith('--config=')).removeprefix('--config=')
        try:
            config_lib.load(spec)
        except ValueError as error:
            raise ValueError(f'cell {spec!r}: {error}') from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if '--' in argv:  # everything after '--' goes to jit_jax.main unchanged
        extra = argv[argv.index('--') + 1:]
        argv = argv[:argv.index('--')]
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', required=True, help='config file, e.g. configs/default.py')
    parser.add_argument('--workdir', required=True, help='root folder; each cell gets a subfolder')
    parser.add_argument('--grid', action='append', default=[], help='key=v1,v2,... (repeatable)')
    parser.add_argument('--set', default='', help='overrides shared by every cell, e.g. cfg=2.0,steps=500')
    parser.add_argument('--run', action='store_true', help='run the cells sequentially here')
    parser.add_argument('--keep_going', action='store_true', help='with --run: continue after a failed cell')
    parser.add_argument('--no_check', action='store_true', help='skip building and validating each cell')
    parser.add_argument('--python', default=sys.executable, help='interpreter for the commands')
    parser.add_argument('--emit', choices=('commands', 'slurm', 'tpu'), default='commands',
                        help='plain commands, one SLURM array job, or one TPU slice per cell')
    parser.add_argument('--cells_file', default='sweep_cells.txt', help='--emit slurm: cell argument lines')
    parser.add_argument('--sbatch_flags', default='', help="--emit slurm: e.g. '--nodes=2 --time=24:00:00'")
    parser.add_argument('--tpu_name', default='jit-sweep', help='--emit tpu: slice name prefix')
    parser.add_argument('--tpu_flags', default='', help="--emit tpu: tpu_pod.py flags, e.g. '--zone=Z --repo=URL'")
    parser.add_argument('--collect', action='store_true', help='print the final metrics of every cell')
    parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                        help='print the commands only (nothing is written, run or submitted)')
    args = parser.parse_args(argv)
    if args.collect:
        print(collect(args.workdir, args.grid))
        return 0

    try:
        argvs = commands(args.config, args.workdir, args.grid, args.set, extra, args.python)
        if not args.no_check:
            check(argvs)
    except ValueError as error:
        print(f'sweep: {error}', file=sys.stderr)
        return 2
    if args.emit == 'slurm':
        submit = slurm_submit(argvs, args.cells_file, args.sbatch_flags)
        lines = [shlex.join(main_args(argv)) for argv in argvs]
        if args.dry_run:
            print('\n'.join(f'# {args.cells_file}:{i + 1}: {line}' for i, line in enumerate(lines)))
        else:
            from etils import epath  # pylint: disable=import-outside-toplevel

            epath.Path(args.cells_file).write_text('\n'.join(lines) + '\n')
        print(shlex.join(submit))
        argvs = [submit]
    elif args.emit == 'tpu':
        argvs = tpu_commands(argvs, args.tpu_name, args.tpu_flags, args.python)
    if not args.run or args.dry_run:
        if args.emit != 'slurm':
            for cmd in argvs:
                print(shlex.join(cmd))
        return 0
    failed = []
    for i, cmd in enumerate(argvs):
        print(f'[sweep {i + 1}/{len(argvs)}] {shlex.join(cmd)}', flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
        if subprocess.run(cmd, env=env).returncode:
            failed.append(shlex.join(cmd))
            if not args.keep_going:
                break
    for cmd in failed:
        print(f'[sweep] FAILED: {cmd}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
