"""Expand a grid of config overrides into one training command per cell, and print or run them.

    python launch/sweep.py --config configs/default.py --workdir /tmp/sweep \\
        --grid patch=4,8 --grid bottleneck=8,16,full [--set cfg=2.0] [--run] [-- --extra_main_flag=...]

Each cell becomes `--config configs/default.py:<base overrides>,patch=4,bottleneck=8` with its own
workdir `<workdir>/patch=4,bottleneck=8`, so cells resume independently and never share checkpoints.
The overrides use the same `key=value` syntax and aliases as `--config file.py:<arg>`
(jit_jax.config_lib.apply_overrides). Before anything is printed or run, every cell's config is built
and validated, so a typo in the grid fails here rather than an hour into the sweep.

`--run` runs the cells one after another on this machine (small CPU / single-host sweeps). On a cluster,
print the commands and hand each line to the scheduler instead.
"""

from __future__ import annotations

import argparse
import itertools
import os
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
                      f'--workdir={pathlib.PurePath(workdir) / cell_name(pairs)}', *extra_args])
    return argvs


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
    args = parser.parse_args(argv)

    try:
        argvs = commands(args.config, args.workdir, args.grid, args.set, extra, args.python)
        if not args.no_check:
            check(argvs)
    except ValueError as error:
        print(f'sweep: {error}', file=sys.stderr)
        return 2
    if not args.run:
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
