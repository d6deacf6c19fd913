"""Small-scale reproduction of the JiT ablations: prediction x loss space (paper Table 2) and bottleneck (Fig. 4).

The paper's claim: when a patch has more dimensions than the network can carry (256 px, 16 x 16 x 3 = 768-d
patches into 768 hidden dims), only x-prediction works, for every loss space; eps- and v-prediction must
reproduce full-rank noise and fail. With small patches (64 px, 48-d patches) all nine combinations work. A
low-rank (bottleneck) patch embedding does not hurt x-prediction, and widths down to 16-32 still work.

Setup (chosen so the failure condition holds by construction and a cell costs ~2 minutes of 2 CPU cores):
the embedded default data (jit_jax.data.synthetic, 32 px shapes, 10 classes, 18 latent dimensions) and the
default recipe (configs/default.py: AdamW, logit-normal t, label drop, Heun + CFG), with patch 8 -> 16
tokens of 8 x 8 x 3 = 192 dims, and a 3-block JiT of width 64. The output head is Linear(64 -> 192) per
token, so an eps- or v-network can emit at most a 64-dim subspace of each 192-dim noise patch: 2/3 of the
noise it must predict is unreachable, whereas a clean patch is close to a low-dim manifold. That is the
paper's 256 px regime made explicit (there the rank is full but the capacity is not).

Every cell is an ordinary training run: `configs/default.py:<overrides>` loaded by config_lib.load and
trained by train.train_and_evaluate in its own workdir (OUT/cells/<cell>), so it has checkpoints, CLU
logs (TensorBoard: the loss curve) and resume; a rerun of the same command continues where it stopped.
Progress over the whole grid (steps/s, ETA) is a clu ReportProgress hook. Each finished cell is scored
by jit_jax.experiments.scores from its final checkpoint (EMA weights, config.sampler.ema).

    python -m jit_jax.experiments.ablation --out /tmp/ablation [--grid pred_loss|bottleneck|all|lowdim]
                                           [--steps N] [--quick] [--cells NAME,...] [--replot]

writes results.json (every cell, every figure, the settings), table.md, ablation.png and samples.npz (the
sample strips, so --replot can redraw without training). `--grid lowdim` is the control of Table 2b:
48-d patches, narrower than the width, where eps- and v-prediction become reachable again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from jit_jax import checkpoint as ckpt_lib
from jit_jax import config_lib, train
from jit_jax.experiments import plots, scores

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / 'configs' / 'default.py'

GRIDS = ('pred_loss', 'bottleneck', 'all', 'lowdim')
SPACES = ('x', 'eps', 'v')
BOTTLENECKS = (4, 8, 16, 32, 0)  # 0 = full rank (patch dim); the pred/loss grid uses full rank
SWEEP_PREDS = ('x', 'eps')  # x-pred is the paper's sweep; eps-pred shows the contrast
# eps-pred is swept only where x-pred should still work (paper: 16-32), plus full rank from the 3x3 grid:
# one extra cell shows whether a bottleneck rescues or worsens it, the full sweep would cost four.
CONTRAST_BOTTLENECKS = (16, 0)
# 14 cells x 800 steps: 2070 CPU-s under load (roughly 20 min on 2 idle cores). The 3x3 pattern is clear
# at 400 steps; x-pred sample quality still improves up to 1000 (FD 9.5 / 2.8 / 1.6 at 400 / 800 / 1000).
DEFAULT_STEPS = 800

# The paper's other half (Table 2b: 64 px, 48-d patches, all nine work), as a separate grid: patch 4 makes
# 4 x 4 x 3 = 48-d patches, narrower than the width, so eps and v become reachable. 64 tokens instead of 16
# make a cell ~3x dearer, hence three cells (x/eps/v-pred, v-loss) and not part of 'all'.
LOWDIM_PATCH = 4
# The architecture, shared by every cell. Width 64 < patch dim 192: see the module docstring.
MODEL = {'patch': 8, 'hidden': 64, 'depth': 3, 'heads': 2, 'ctx_len': 4, 'ctx_start': 1}
QUICK_MODEL = {'patch': 8, 'hidden': 32, 'depth': 1, 'heads': 1, 'ctx_len': 2, 'ctx_start': 0}
QUICK_EVAL = scores.EvalSettings(num_heldout=20, num_reference=100, samples_per_class=2, sampler_steps=3)
FIGURE_KEYS = {'mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp'} | {f'{t:g}' for t in scores.T_GRID}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run: prediction space, loss space and bottleneck width (0 = full rank)."""

    pred: str
    loss: str
    bottleneck: int
    grids: tuple[str, ...]
    patch: int = 0  # 0 = MODEL's patch size

    @property
    def name(self) -> str:
        suffix = f'/p{self.patch}' if self.patch else ''
        return f'{self.pred}-pred/{self.loss}-loss/bn-{self.bottleneck or "full"}{suffix}'

    @property
    def key(self) -> str:
        """The name as one path component: the cell's workdir and its key in samples.npz."""
        return self.name.replace('/', '__')


def make_cells(grid: str, quick: bool = False) -> list[Cell]:
    """The cells of a grid; a cell that belongs to both grids (x/v and eps/v at full rank) runs once.

    `quick` keeps two cells that still contrast (x-pred vs eps-pred, or a narrow vs a full bottleneck).
    """
    if grid not in GRIDS:
        raise ValueError(f'--grid={grid!r}: expected one of {GRIDS}')
    if grid == 'lowdim':
        preds = ('x', 'eps') if quick else SPACES
        return [Cell(pred, 'v', 0, ('lowdim',), patch=LOWDIM_PATCH) for pred in preds]
    cells: dict[tuple[str, str, int], set[str]] = {}
    if grid in ('pred_loss', 'all'):
        for pred in SPACES:
            for loss in SPACES:
                cells.setdefault((pred, loss, 0), set()).add('pred_loss')
    if grid in ('bottleneck', 'all'):
        for pred in SWEEP_PREDS:
            for width in BOTTLENECKS if pred == 'x' else CONTRAST_BOTTLENECKS:
                cells.setdefault((pred, 'v', width), set()).add('bottleneck')
    out = [Cell(p, l, b, tuple(sorted(g))) for (p, l, b), g in cells.items()]
    if quick:
        keep = [('x', 'v', 0), ('eps', 'v', 0)] if grid != 'bottleneck' else [('x', 'v', 8), ('x', 'v', 0)]
        out = [c for c in out if (c.pred, c.loss, c.bottleneck) in keep]
    return out


def cell_config(cell: Cell, steps: int, *, quick: bool = False, seed: int = 0, log_every: int = 50,
                base: str | pathlib.Path = DEFAULT_CONFIG) -> config_dict.ConfigDict:
    """`configs/default.py:<overrides>` through config_lib.load: the cell is exactly that command line.

    EMA horizons of a quarter and an eighth of the run, so that ema1 holds e^-4 of the initial weights at
    the end; warmup is a tenth of the run. No periodic sample grids (the scorer draws its own samples).
    """
    ema = (round(1 - 4 / steps, 6), round(1 - 8 / steps, 6))
    items = {**(QUICK_MODEL if quick else MODEL), 'bottleneck': cell.bottleneck, 'pred': cell.pred,
             'loss': cell.loss, 'steps': steps, 'warmup': max(steps // 10, 1), 'ema': f'({ema[0]},{ema[1]})',
             'seed': seed, 'train.log_every_steps': max(1, min(log_every, steps)), 'train.sample_every_steps': 0}
    if cell.patch:
        items['patch'] = cell.patch
    if quick:
        items['batch'] = 16
    return config_lib.load(f'{base}:' + ','.join(f'{k}={v}' for k, v in items.items()))


def _grid_progress(report: Any, offset: int):
    """A train_and_evaluate hook feeding the grid-wide clu ReportProgress with the grid's step count."""

    def hook(step: int, **_) -> None:
        report(offset + step)

    return hook


def run_cell(config: config_dict.ConfigDict, cell: Cell, workdir: pathlib.Path, scorer: scores.Scorer,
             hooks: Sequence[Any]) -> tuple[dict, np.ndarray]:
    """Train (or resume) one cell with train_and_evaluate, then score its final checkpoint.

    A non-finite loss ends the cell (recorded as diverged, figures NaN) instead of the whole grid: a
    failing combination is a result here, not a bug.
    """
    t0 = time.time()
    first_step: list[float] = []  # seconds to the first step: trainer build, restore, compile, first batch

    def clock(step: int, **_) -> None:  # pylint: disable=unused-argument
        if not first_step:
            first_step.append(time.time() - t0)

    diverged_at, last = None, {}
    try:
        last = train.train_and_evaluate(config, workdir, hooks=[clock, *hooks])
    except train.NonFiniteLossError as error:
        diverged_at = error.step
    trainer = train.Trainer(config)
    m = trainer.model_config
    steps = config.train.num_steps
    row: dict[str, Any] = {
        'name': cell.name, 'grids': list(cell.grids), 'pred': cell.pred, 'loss': cell.loss,
        'bottleneck': cell.bottleneck or 'full', 'bottleneck_dim': m.bottleneck_dim, 'patch_size': m.patch_size,
        'patch_dim': m.patch_size ** 2 * m.in_channels, 'steps': steps, 'diverged_at': diverged_at,
        'final_loss': last.get('loss'), 'workdir': str(workdir), 'train_seconds': round(time.time() - t0, 1),
        'first_step_seconds': round(first_step[0], 1) if first_step else None,
    }
    size = m.input_size
    if diverged_at is not None:
        row.update(mse={f'{t:g}': math.nan for t in scores.T_GRID},
                   **{k: math.nan for k in ('mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp')})
        return row, np.zeros((len(scorer.sample_labels), size, size, m.in_channels), np.uint8)

    t1 = time.time()
    checkpointer = ckpt_lib.Checkpointer(workdir / 'checkpoints', asynchronous=False)
    try:
        if checkpointer.latest_step() != steps:
            raise RuntimeError(f'{checkpointer.directory}: expected the final checkpoint (step {steps}), found '
                               f'{checkpointer.latest_step()}')
        state = checkpointer.restore(steps, ckpt_lib.abstract_with_shardings(
            trainer.abstract_state, trainer.state_shardings), None)
    finally:
        checkpointer.close()
    with jax.set_mesh(trainer.mesh):
        figures, pixels = scorer.score(trainer.sampling_model(state), trainer.flow, trainer.sampler,
                                       (size, size, m.in_channels))
    row.update(figures, eval_seconds=round(time.time() - t1, 1))
    return row, pixels


def settings_record(config: config_dict.ConfigDict, args: argparse.Namespace, scorer: scores.Scorer,
                    sampler_steps: int) -> dict:
    """Everything needed to repeat the run and read its numbers."""
    m = config.model
    return {
        'command': 'python -m jit_jax.experiments.ablation ' + ' '.join(args.argv),
        'base_config': str(args.config), 'quick': args.quick, 'grid': args.grid, 'steps': args.steps,
        'seed': args.seed, 'image_size': config.data.image_size, 'num_classes': config.data.num_classes,
        'patch_size': m.patch_size, 'patch_dim': m.patch_size ** 2 * m.in_channels,
        'tokens': (config.data.image_size // m.patch_size) ** 2,
        'hidden_size': m.hidden_size, 'depth': m.depth, 'num_heads': m.num_heads,
        'in_context_len': m.in_context_len, 'in_context_start': m.in_context_start,
        'global_batch_size': config.data.global_batch_size, 'lr': config_lib.lr(config),
        'warmup_steps': config.optim.warmup_steps, 'ema_decays': list(config.optim.ema_decays),
        'p_mean': config.diffusion.p_mean, 'p_std': config.diffusion.p_std, 't_eps': config.diffusion.t_eps,
        'noise_scale': config.diffusion.noise_scale, 'label_drop_prob': config.diffusion.label_drop_prob,
        'sampler': {'method': config.sampler.method, 'num_steps': sampler_steps,
                    'cfg_scale': config.sampler.cfg_scale,
                    'interval': [config.sampler.interval_min, config.sampler.interval_max],
                    'weights': config.sampler.ema},
        't_grid': list(scores.T_GRID), 'num_heldout': len(scorer.heldout), 'num_reference': len(scorer.reference),
        'samples_per_class': scorer.settings.samples_per_class, 'rp_dim': scorer.projection.shape[1],
        'seeds': {'train_data': 0, 'heldout': scores.HELDOUT_SEED, 'reference': scores.REFERENCE_SEED,
                  'noise': scores.NOISE_SEED, 'sample': scores.SAMPLE_SEED, 'projection': scores.PROJECTION_SEED},
        'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()], 'python': platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------
# Outputs: table.md and ablation.png (jit_jax.experiments.plots), samples.npz


def strip_for(pixels: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` samples of every class, class by class: u8[k, h, w, c]."""
    picks = [i for cls in np.unique(labels) for i in np.flatnonzero(labels == cls)[:per_class]]
    return pixels[picks]


def write_reports(results: dict, strips: dict[str, np.ndarray], out: pathlib.Path) -> None:
    (out / 'table.md').write_text(plots.ablation_tables(results))
    plots.ablation_figure(results, strips, out / 'ablation.png')


def _json_safe(tree: Any) -> Any:
    """NaN / inf -> None: JSON has no NaN, and a diverged cell must still give a valid file."""
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_safe(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def _nan_from_null(tree: Any) -> Any:
    """Undo _json_safe for the figures: a null figure is a diverged cell's NaN."""
    if isinstance(tree, dict):
        return {k: math.nan if v is None and k in FIGURE_KEYS else _nan_from_null(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_nan_from_null(v) for v in tree]
    return tree


def replot(out: pathlib.Path) -> None:
    """table.md and ablation.png again from results.json and samples.npz (no JAX work)."""
    results = _nan_from_null(json.loads((out / 'results.json').read_text()))
    strips = {}
    if (out / 'samples.npz').is_file():
        with np.load(out / 'samples.npz') as data:
            strips = {c['name']: data[c['name'].replace('/', '__')] for c in results['cells']
                      if c['name'].replace('/', '__') in data.files}
    write_reports(results, strips, out)
    print(f"rewrote {out / 'table.md'} and {out / 'ablation.png'}")


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.experiments.ablation',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='output folder (results.json, table.md, ablation.png, '
                                                     'cells/<cell>: each cell\'s workdir)')
    parser.add_argument('--grid', default='all', choices=GRIDS)
    parser.add_argument('--steps', type=int, default=None, help=f'train steps per cell (default {DEFAULT_STEPS}; '
                                                                 'quick: 10)')
    parser.add_argument('--quick', action='store_true', help='two cells, a 1-block model, tiny evaluation '
                                                             '(smoke test)')
    parser.add_argument('--seed', type=int, default=0, help='config.seed: model init, t / noise draws')
    parser.add_argument('--config', type=pathlib.Path, default=DEFAULT_CONFIG,
                        help='the base recipe (configs/default.py)')
    parser.add_argument('--log-every', type=int, default=50, help='steps between progress lines')
    parser.add_argument('--replot', action='store_true', help='only redraw table.md and ablation.png from '
                                                              'DIR/results.json and DIR/samples.npz')
    parser.add_argument('--cells', default='', help='comma-separated cell names to keep (default: all), e.g. '
                        '"x-pred/v-loss/bn-full,eps-pred/v-loss/bn-full"')
    args = parser.parse_args(list(argv))
    args.argv = list(argv)
    if args.steps is None:
        args.steps = 10 if args.quick else DEFAULT_STEPS
    if args.steps < 10:
        parser.error(f'--steps={args.steps}: at least 10 (warmup and EMA follow the run length)')
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    from absl import logging  # pylint: disable=import-outside-toplevel
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel

    from jit_jax import main as main_lib  # pylint: disable=import-outside-toplevel

    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if args.replot:
        replot(out)
        return {}
    logging.set_verbosity(logging.INFO)  # the training loop and ReportProgress log at INFO
    main_lib.quiet_library_logs()
    out.mkdir(parents=True, exist_ok=True)
    wall = time.time()
    cells = make_cells(args.grid, quick=args.quick)
    if args.cells:
        wanted = [name.strip() for name in args.cells.split(',') if name.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cells})
        if unknown:
            raise SystemExit(f'--cells: {unknown} not in --grid={args.grid}; its cells are '
                             f'{[c.name for c in cells]}')
        cells = [c for c in cells if c.name in wanted]
    configs = [cell_config(c, args.steps, quick=args.quick, seed=args.seed, log_every=args.log_every,
                           base=args.config) for c in cells]
    first = configs[0]
    settings = QUICK_EVAL if args.quick else scores.EvalSettings()
    print(f'ablation: {len(cells)} cells x {args.steps} steps; rendering {settings.num_reference} reference and '
          f'{settings.num_heldout} held-out images', flush=True)
    scorer = scores.Scorer(first.data.image_size, first.data.num_classes, settings)
    print(f"real baseline: NN RMSE {scorer.real['nn_rmse']:.4f}, NN label acc {scorer.real['nn_label_acc']:.3f}, "
          f"FD {scorer.real['fd_rp']:.4f}", flush=True)
    log_every = first.train.log_every_steps
    report = periodic_actions.ReportProgress(  # steps/s and ETA over the whole grid
        num_train_steps=args.steps * len(cells), every_steps=None, every_secs=None,
        on_steps=[i * args.steps + s for i in range(len(cells)) for s in range(log_every, args.steps + 1, log_every)])
    rows, strips = [], {}
    for i, (cell, config) in enumerate(zip(cells, configs)):
        workdir = out / 'cells' / cell.key
        print(f'cell {i + 1}/{len(cells)} {cell.name}: training in {workdir}', flush=True)
        row, pixels = run_cell(config, cell, workdir, scorer, [_grid_progress(report, i * args.steps)])
        rows.append(row)
        strips[cell.name] = strip_for(pixels, scorer.sample_labels, settings.strip_per_class)
        print(f"cell {i + 1}/{len(cells)} {cell.name} done: MSE mean {plots.fmt(row['mse_mean'], 4)}, NN RMSE "
              f"{plots.fmt(row['nn_rmse'], 4)}, FD {plots.fmt(row['fd_rp'], 4)} ({row['train_seconds']} s train, "
              f"{row.get('eval_seconds', 0)} s eval)", flush=True)
    sampler_steps = settings.sampler_steps or first.sampler.num_steps
    results = {'settings': settings_record(first, args, scorer, sampler_steps),
               'baselines': {'real': scorer.real}, 'cells': rows, 'wall_seconds': round(time.time() - wall, 1)}
    (out / 'results.json').write_text(json.dumps(_json_safe(results), indent=2) + '\n')
    # The strips are kept so that `--replot` can redraw the table and figure without training again.
    np.savez_compressed(out / 'samples.npz', **{k.replace('/', '__'): v for k, v in strips.items()})
    write_reports(results, strips, out)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'ablation.png'} "
          f"in {results['wall_seconds']:.0f} s", flush=True)
    return results


if __name__ == '__main__':
    main()
