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

Every cell is trained with the project's own `train.Trainer` and Grain pipeline and scored with figures
that need no downloaded network:

1. Held-out x-space denoising MSE at t in T_GRID: the network's output converted to x (Table 1), on the
   same held-out images and the same noise for every cell. It is what the paper's argument is about: can
   the network recover the clean image from z_t.
2. Sample quality of class-conditional CFG samples (same labels and start noise for every cell):
   * nn_rmse: per-pixel RMSE from each sample to its nearest neighbour among NUM_REFERENCE real images.
     Noise left in a sample, or a broken shape, moves it off the data manifold and raises this; a good
     sample sits as close to the reference set as a held-out real image does (the `real` baseline).
   * fd_rp: Frechet distance between samples and reference images in a fixed random orthonormal
     projection of pixel space (RP_DIM dims). A random projection weighs all frequencies alike, so it
     sees residual noise (too much variance), blur or collapse (too little) and colour shifts (means),
     which the nearest-neighbour figure does not: it is about the distribution, not single images.
   * nn_label_acc: the fraction of samples whose nearest real neighbour has the requested class; a
     weak, background-dominated check that conditioning works, reported with its real baseline.

    python -m jit_jax.experiments.ablation --out /tmp/ablation [--grid pred_loss|bottleneck|all|lowdim]
                                           [--steps N] [--quick] [--cells NAME,...] [--replot]

writes results.json (every cell, every figure, the settings), table.md, ablation.png and samples.npz (the
sample strips, so --replot can redraw without training). `--grid lowdim` is the control of Table 2b:
48-d patches, narrower than the width, where eps- and v-prediction become reachable again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from jit_jax import config_lib, diffusion, sampling, sharding, train
from jit_jax.data import pipeline, synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / 'configs' / 'default.py'

GRIDS = ('pred_loss', 'bottleneck', 'all', 'lowdim')
SPACES = ('x', 'eps', 'v')
T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
BOTTLENECKS = (4, 8, 16, 32, 0)  # 0 = full rank (patch dim); the pred/loss grid uses full rank
SWEEP_PREDS = ('x', 'eps')  # x-pred is the paper's sweep; eps-pred shows the contrast
# eps-pred is swept only where x-pred should still work (paper: 16-32), plus full rank from the 3x3 grid:
# one extra cell shows whether a bottleneck rescues or worsens it, the full sweep would cost four.
CONTRAST_BOTTLENECKS = (16, 0)
# 14 cells x 800 steps took 40.5 min wall on 2 cores shared with other jobs (load ~7; 2070 CPU-s, so
# roughly 20 min on 2 idle cores). The 3x3 pattern is already clear at 400 steps; x-pred sample quality
# still improves up to 1000 (FD 9.5 at 400, 2.8 at 800, 1.6 at 1000 for x-pred / v-loss).
DEFAULT_STEPS = 800

# The paper's other half (Table 2b: 64 px, 48-d patches, all nine work), as a separate grid: patch 4 makes
# 4 x 4 x 3 = 48-d patches, narrower than the width, so eps and v become reachable. 64 tokens instead of 16
# make a cell ~3x dearer, hence three cells (x/eps/v-pred, v-loss) and not part of 'all'.
LOWDIM_PATCH = 4
# The architecture, shared by every cell. Width 64 < patch dim 192: see the module docstring.
MODEL = {'patch': 8, 'hidden': 64, 'depth': 3, 'heads': 2, 'ctx_len': 4, 'ctx_start': 1}
QUICK_MODEL = {'patch': 8, 'hidden': 32, 'depth': 1, 'heads': 1, 'ctx_len': 2, 'ctx_start': 0}

# Data seeds of jit_jax.data.synthetic.SyntheticShapes: training uses seed 0 (the pipeline's source), so
# these streams hold images the network never saw.
HELDOUT_SEED = 1
REFERENCE_SEED = 2
NOISE_SEED = 1234  # held-out denoising noise
SAMPLE_SEED = 4321  # sampler start noise
PROJECTION_SEED = 99
RP_DIM = 64


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Sizes of the evaluation; `quick` shrinks them for the smoke test."""

    num_heldout: int = 200  # held-out images for the denoising MSE and the real baselines (20 per class)
    num_reference: int = 5000  # real images the samples are compared with
    samples_per_class: int = 20  # 200 samples, the same count as the held-out baseline
    sampler_steps: int = 0  # 0 = the config's sampler.num_steps
    strip_per_class: int = 1  # samples per class shown in the figure


QUICK_EVAL = EvalSettings(num_heldout=20, num_reference=100, samples_per_class=2, sampler_steps=3)


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


def load_default_config(path: pathlib.Path, arg: str) -> config_dict.ConfigDict:
    """configs/default.py's get_config(arg), imported by path as ml_collections' config flags do.

    The recipe lives in one place (configs/ is not an installed package), so an ablation cell is exactly
    `--config configs/default.py:<overrides>`.
    """
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: --config must name configs/default.py (or a copy of it) '
                                'inside a jit_jax checkout')
    spec = importlib.util.spec_from_file_location(f'ablation_base_config_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def cell_overrides(cell: Cell, steps: int, quick: bool, seed: int) -> str:
    """The override string for configs/default.py; warmup and EMA follow the run length as default.py does."""
    model = QUICK_MODEL if quick else MODEL
    # EMA horizons of a quarter and an eighth of the run (default.py's rule), so that ema1 holds
    # e^-4 of the initial weights at the end; warmup is a tenth of the run.
    ema = (round(1 - 4 / steps, 6), round(1 - 8 / steps, 6))
    items = {**model, 'bottleneck': cell.bottleneck or 0, 'pred': cell.pred, 'loss': cell.loss,
             'steps': steps, 'warmup': max(steps // 10, 1), 'ema': f'({ema[0]},{ema[1]})', 'seed': seed}
    if cell.patch:
        items['patch'] = cell.patch
    if quick:
        items['batch'] = 16
    return ','.join(f'{k}={v}' for k, v in items.items())


# ---------------------------------------------------------------------------------------------------------
# Real data for the figures


def render_set(seed: int, count: int, num_classes: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """count images of the synthetic stream `seed` in [-1, 1] (the pipeline's scaling), labels balanced."""
    source = synthetic.SyntheticShapes(num_examples=count, image_size=image_size, num_classes=num_classes,
                                       seed=seed)
    examples = [source[i] for i in range(count)]
    images = np.stack([e['image'] for e in examples]).astype(np.float32) / np.float32(127.5) - 1.0
    return images, np.array([e['label'] for e in examples], np.int32)  # f32[n, h, w, c], i32[n]


def random_projection(dim: int, out_dim: int, seed: int) -> np.ndarray:
    """f32[dim, out_dim] with orthonormal columns: a fixed random subspace of pixel space."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, out_dim)))
    return q.astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) for features a f[n, k], b f[m, k].

    The symmetric form needs only eigh (no scipy sqrtm), and stays real for rank-deficient covariances.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, u = np.linalg.eigh(cov_a)
    root_a = (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray,
                       block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per query (f[n, d]) the per-pixel RMSE to its nearest reference row (f[m, d]) and that row's index."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(reference, np.float64)
    r_sq = np.sum(r * r, axis=1)
    dists, index = [], []
    for start in range(0, len(q), block):
        chunk = q[start:start + block]
        d2 = np.sum(chunk * chunk, axis=1)[:, None] + r_sq[None] - 2.0 * chunk @ r.T  # f[b, m]
        best = np.argmin(d2, axis=1)
        index.append(best)
        dists.append(np.sqrt(np.clip(d2[np.arange(len(chunk)), best], 0.0, None) / q.shape[1]))
    return np.concatenate(dists), np.concatenate(index)


class Scorer:
    """Real data and the fixed draws every cell is scored against (built once per run)."""

    def __init__(self, image_size: int, num_classes: int, settings: EvalSettings):
        self.settings = settings
        self.num_classes = num_classes
        heldout = settings.num_heldout - settings.num_heldout % num_classes
        if heldout < num_classes:
            raise ValueError(f'num_heldout={settings.num_heldout} must hold at least one image per class '
                             f'({num_classes})')
        self.heldout, self.heldout_labels = render_set(HELDOUT_SEED, heldout, num_classes, image_size)
        self.reference, self.reference_labels = render_set(REFERENCE_SEED, settings.num_reference, num_classes,
                                                           image_size)
        self.noise = np.random.default_rng(NOISE_SEED).normal(size=self.heldout.shape).astype(np.float32)
        dim = int(np.prod(self.heldout.shape[1:]))
        self.projection = random_projection(dim, min(RP_DIM, dim), PROJECTION_SEED)
        self.reference_flat = self.reference.reshape(len(self.reference), -1)
        self.reference_features = self.reference_flat @ self.projection
        self.sample_labels = np.repeat(np.arange(num_classes, dtype=np.int32), settings.samples_per_class)
        # The floor of the sample figures: held-out real images scored exactly like samples. Same count
        # as the samples (when possible), so the small-sample bias of the Frechet distance is shared.
        floor = self.heldout[:len(self.sample_labels)]
        self.real = self.image_figures(floor, self.heldout_labels[:len(floor)])

    def image_figures(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """nn_rmse, nn_label_acc and fd_rp of images f32[n, h, w, c] in [-1, 1] with requested labels."""
        flat = images.reshape(len(images), -1).astype(np.float64)
        dist, index = nearest_neighbours(flat, self.reference_flat)
        return {'nn_rmse': float(np.mean(dist)),
                'nn_label_acc': float(np.mean(self.reference_labels[index] == labels)),
                'fd_rp': frechet_distance(flat @ self.projection, self.reference_features)}

    def denoising_mse(self, model: Any, pred: str, noise_scale: float, t_eps: float) -> dict[str, float]:
        """Mean x-space squared error per t on the held-out set (same images and noise in every cell)."""
        out = {}
        for t in T_GRID:
            x_hat = _denoise(model, jnp.asarray(self.heldout), jnp.asarray(noise_scale * self.noise),
                             jnp.full((len(self.heldout),), t, jnp.float32), jnp.asarray(self.heldout_labels),
                             pred=pred, t_eps=t_eps)
            out[f'{t:g}'] = float(np.mean((np.asarray(x_hat, np.float64) - self.heldout) ** 2))
        return out


@functools.partial(nnx.jit, static_argnames=('pred', 't_eps'))
def _denoise(model: Any, x: jax.Array, e: jax.Array, t: jax.Array, y: jax.Array, *, pred: str,
             t_eps: float) -> jax.Array:
    """The network's estimate of x from z_t = t x + (1 - t) e, whatever space it predicts in (Table 1)."""
    z = diffusion.interpolate(x, e, t)  # f32[b, h, w, c]
    return diffusion.convert_output(model(z, t, y), z, t, pred=pred, space='x', t_eps=t_eps)


# ---------------------------------------------------------------------------------------------------------
# Running the cells


class Progress:
    """One line per log step: cell i/N, step, loss, elapsed and an ETA for the whole grid.

    The ETA spreads everything done so far (compilation and scoring included) over the steps done, so it
    is rough for the first cell and good after it.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.done_steps = 0
        self.start = time.time()

    def line(self, index: int, count: int, cell: Cell, step: int, steps: int, loss: float) -> str:
        elapsed = time.time() - self.start
        eta = elapsed / max(self.done_steps, 1) * (self.total_steps - self.done_steps)
        return (f'cell {index}/{count} {cell.name:<24} step {step:>5}/{steps} loss {loss:10.4f} '
                f'elapsed {_hms(elapsed)} ETA {_hms(eta)}')


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run_cell(config: config_dict.ConfigDict, cell: Cell, scorer: Scorer, progress: Progress, index: int,
             count: int, log_every: int) -> tuple[dict, np.ndarray]:
    """Train one cell with the project's Trainer and Grain pipeline, then score it; returns (row, samples u8).

    A non-finite loss ends the cell early (recorded as diverged) instead of the whole grid: a failing
    combination is a result here, not a bug.
    """
    t0 = time.time()
    trainer = train.Trainer(config)
    data = pipeline.make_train_iterator(config.data, seed=config.seed)
    state = trainer.init()
    steps = config.train.num_steps
    curve, window, window_count, diverged_at = [], jnp.zeros(()), 0, None
    with jax.set_mesh(trainer.mesh):
        for step in range(steps):
            batch = sharding.global_batch(next(data), trainer.mesh)
            state, metrics = trainer.step_fn(state, batch)
            window = window + metrics['loss']  # stays on the device until a log step
            window_count += 1
            progress.done_steps += 1
            done = step + 1
            if done == 1:
                first_step_seconds = time.time() - t0  # trainer build, init, compile, first batch
            if done % log_every == 0 or done == steps:
                loss = float(window) / window_count
                curve.append([done, loss])
                window, window_count = jnp.zeros(()), 0
                print(progress.line(index, count, cell, done, steps, loss), flush=True)
                if not math.isfinite(loss):
                    diverged_at = done
                    progress.done_steps += steps - done
                    break
    train_seconds = time.time() - t0

    row: dict[str, Any] = {
        'name': cell.name, 'grids': list(cell.grids), 'pred': cell.pred, 'loss': cell.loss,
        'bottleneck': cell.bottleneck or 'full', 'bottleneck_dim': trainer.model_config.bottleneck_dim,
        'patch_size': trainer.model_config.patch_size,
        'patch_dim': trainer.model_config.patch_size ** 2 * trainer.model_config.in_channels,
        'steps': steps, 'diverged_at': diverged_at, 'final_loss': curve[-1][1] if curve else None,
        'loss_curve': curve, 'train_seconds': round(train_seconds, 1),
        'first_step_seconds': round(first_step_seconds, 1),
    }
    size = trainer.model_config.input_size
    if diverged_at is not None:
        nan = float('nan')
        row.update(mse={f'{t:g}': nan for t in T_GRID}, mse_mean=nan, nn_rmse=nan, nn_label_acc=nan, fd_rp=nan)
        return row, np.zeros((len(scorer.sample_labels), size, size, 3), np.uint8)

    t1 = time.time()
    model = trainer.sampling_model(state)
    with jax.set_mesh(trainer.mesh):
        row['mse'] = scorer.denoising_mse(model, trainer.flow.pred, trainer.flow.noise_scale, trainer.flow.t_eps)
        row['mse_mean'] = float(np.mean(list(row['mse'].values())))
        spec = trainer.sampler
        if scorer.settings.sampler_steps:
            spec = dataclasses.replace(spec, num_steps=scorer.settings.sampler_steps)
        out = sampling.sample_from_seed(model, jnp.asarray(scorer.sample_labels), jax.random.key(SAMPLE_SEED),
                                        spec, (size, size, trainer.model_config.in_channels),
                                        trainer.flow.noise_scale)
        pixels = np.asarray(jax.device_get(sampling.to_uint8(out)))
    # Score the exported uint8 images, the same quantisation the real images have.
    row.update(scorer.image_figures(pixels.astype(np.float32) / np.float32(127.5) - 1.0, scorer.sample_labels))
    row['eval_seconds'] = round(time.time() - t1, 1)
    return row, pixels


def settings_record(config: config_dict.ConfigDict, args: argparse.Namespace, scorer: Scorer,
                    sampler_steps: int) -> dict:
    """Everything needed to repeat the run and read its numbers."""
    m = config.model
    patch_dim = m.patch_size ** 2 * m.in_channels
    return {
        'command': 'python -m jit_jax.experiments.ablation ' + ' '.join(args.argv),
        'base_config': str(args.config), 'quick': args.quick, 'grid': args.grid, 'steps': args.steps,
        'seed': args.seed,
        'image_size': config.data.image_size, 'num_classes': config.data.num_classes,
        'patch_size': m.patch_size, 'patch_dim': patch_dim,
        'tokens': (config.data.image_size // m.patch_size) ** 2,
        'hidden_size': m.hidden_size, 'depth': m.depth, 'num_heads': m.num_heads,
        'in_context_len': m.in_context_len, 'in_context_start': m.in_context_start,
        'global_batch_size': config.data.global_batch_size, 'lr': config_lib.lr(config),
        'warmup_steps': config.optim.warmup_steps, 'ema_decays': list(config.optim.ema_decays),
        'p_mean': config.diffusion.p_mean, 'p_std': config.diffusion.p_std, 't_eps': config.diffusion.t_eps,
        'noise_scale': config.diffusion.noise_scale, 'label_drop_prob': config.diffusion.label_drop_prob,
        'sampler': {'method': config.sampler.method, 'num_steps': sampler_steps,
                    'cfg_scale': config.sampler.cfg_scale, 'interval': [config.sampler.interval_min,
                                                                         config.sampler.interval_max],
                    'weights': config.sampler.ema},
        't_grid': list(T_GRID), 'num_heldout': len(scorer.heldout), 'num_reference': len(scorer.reference),
        'samples_per_class': scorer.settings.samples_per_class, 'rp_dim': scorer.projection.shape[1],
        'seeds': {'train_data': 0, 'heldout': HELDOUT_SEED, 'reference': REFERENCE_SEED, 'noise': NOISE_SEED,
                  'sample': SAMPLE_SEED, 'projection': PROJECTION_SEED},
        'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()], 'python': platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------
# Outputs: table.md and ablation.png


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    if isinstance(value, float):
        return f'{value:.{digits}g}' if abs(value) < 1e4 else f'{value:.3e}'
    return str(value)


def markdown_tables(results: dict) -> str:
    """The paper's Table 2 layout (rows loss, columns prediction) for each figure, then every cell."""
    cells = results['cells']
    s = results['settings']
    lines = [f"Setup: {s['image_size']} px synthetic shapes, patch {s['patch_size']} ({s['patch_dim']}-d patches, "
             f"{s['tokens']} tokens), JiT width {s['hidden_size']}, depth {s['depth']}, batch "
             f"{s['global_batch_size']}, {s['steps']} steps per cell, {s['sampler']['method']} "
             f"{s['sampler']['num_steps']} steps, CFG {s['sampler']['cfg_scale']} on "
             f"{s['sampler']['interval']}.", '']
    grid = {(c['pred'], c['loss']): c for c in cells if 'pred_loss' in c['grids']}
    figures = (('mse_mean', 'held-out x-space MSE, mean over t'), ('nn_rmse', 'sample NN RMSE to real images'),
               ('fd_rp', f"sample Frechet distance (random {s['rp_dim']}-d projection)"))
    if grid:
        for key, title in figures:
            lines += [f'**{title}** (rows: loss space, columns: prediction space; full-rank patch embedding)', '',
                      '| loss \\ pred | x-pred | eps-pred | v-pred |', '|---|---|---|---|']
            for loss in SPACES:
                row = [_fmt(grid[(p, loss)][key]) if (p, loss) in grid else '' for p in SPACES]
                lines.append(f'| {loss}-loss | ' + ' | '.join(row) + ' |')
            lines.append('')
    sweep = [c for c in cells if 'bottleneck' in c['grids']]
    if sweep:
        widths = sorted({c['bottleneck_dim'] for c in sweep})
        lines += ['**Bottleneck sweep** (v-loss; entries: mean MSE / NN RMSE / FD)', '',
                  '| pred \\ bottleneck | ' + ' | '.join(
                      f"{w}{' (full)' if w == s['patch_dim'] else ''}" for w in widths) + ' |',
                  '|---|' + '---|' * len(widths)]
        for pred in SWEEP_PREDS:
            by_width = {c['bottleneck_dim']: c for c in sweep if c['pred'] == pred}
            if by_width:
                lines.append(f'| {pred}-pred | ' + ' | '.join(
                    f"{_fmt(by_width[w]['mse_mean'], 3)} / {_fmt(by_width[w]['nn_rmse'], 3)} / "
                    f"{_fmt(by_width[w]['fd_rp'], 3)}" if w in by_width else '' for w in widths) + ' |')
        lines.append('')
    lowdim = [c for c in cells if 'lowdim' in c['grids']]
    if lowdim:
        lines += [f"**Low-dim patches** (patch {lowdim[0]['patch_size']}: {lowdim[0]['patch_dim']}-d patches, "
                  f"narrower than the width {s['hidden_size']}; v-loss; full-rank embedding)", '',
                  '| pred | MSE mean | NN RMSE | FD |', '|---|---|---|---|']
        for c in lowdim:
            lines.append(f"| {c['pred']}-pred | {_fmt(c['mse_mean'], 3)} | {_fmt(c['nn_rmse'], 3)} | "
                         f"{_fmt(c['fd_rp'], 3)} |")
        lines.append('')
    real = results['baselines']['real']
    lines += ['**All cells** (MSE per t on held-out images; sample figures; `real` = held-out real images '
              'scored like samples)', '',
              '| cell | ' + ' | '.join(f'MSE t={t:g}' for t in T_GRID)
              + ' | MSE mean | NN RMSE | NN label acc | FD | final loss | train s |',
              '|---|' + '---|' * (len(T_GRID) + 6)]
    for c in cells:
        lines.append(f"| {c['name']} | " + ' | '.join(_fmt(c['mse'][f'{t:g}'], 3) for t in T_GRID)
                     + f" | {_fmt(c['mse_mean'], 3)} | {_fmt(c['nn_rmse'], 3)} | {_fmt(c['nn_label_acc'], 3)}"
                     f" | {_fmt(c['fd_rp'], 3)} | {_fmt(c['final_loss'], 3)} | {_fmt(c['train_seconds'])} |")
    lines.append(f"| real | {' | '.join('' for _ in T_GRID)} |  | {_fmt(real['nn_rmse'], 3)} | "
                 f"{_fmt(real['nn_label_acc'], 3)} | {_fmt(real['fd_rp'], 3)} |  |  |")
    lines.append('')
    return '\n'.join(lines)


PRED_COLOURS = {'x': (31, 119, 180), 'eps': (214, 39, 40), 'v': (255, 127, 14)}
LOSS_MARKERS = {'x': 'circle', 'eps': 'square', 'v': 'triangle'}


def _font(size: int):
    from PIL import ImageFont  # pylint: disable=import-outside-toplevel

    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v) and v > 0]


def _log_scale(values, lo_pad: float = 0.1):
    """A function value -> [0, 1] on a log axis spanning the finite positive values (and its bounds)."""
    finite = _finite(values)
    if not finite:
        return (lambda v: 0.5), (1.0, 10.0)
    lo, hi = math.log10(min(finite)), math.log10(max(finite))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * lo_pad
    lo, hi = lo - pad, hi + pad
    return (lambda v: (math.log10(v) - lo) / (hi - lo)), (10 ** lo, 10 ** hi)


def _heat(frac: float) -> tuple[int, int, int]:
    """Green (good, low) -> yellow -> red (bad, high)."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < 0.5:
        return (int(80 + 350 * frac), 190, 90)
    return (245, int(190 - 260 * (frac - 0.5)), 90)


def _marker(draw, x: float, y: float, kind: str, colour, r: int = 4) -> None:
    if kind == 'square':
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == 'triangle':
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _line_chart(draw, box, x_labels: list[str], series: list[tuple[list, tuple, str]], title: str,
                legend: list[tuple[str, tuple, str]], floor: float | None = None, font=None, small=None) -> None:
    """A log-y line chart in box = (x0, y0, x1, y1); series = (ys, colour, marker), NaNs are gaps;
    legend = (name, colour, marker) entries drawn under the plot."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=(0, 0, 0), font=font)
    px0, py0, px1, py1 = x0 + 48, y0 + 22, x1 - 8, y1 - 34
    draw.rectangle([px0, py0, px1, py1], outline=(120, 120, 120))
    values = [v for ys, _, _ in series for v in ys] + ([floor] if floor else [])
    scale, (lo, hi) = _log_scale(values)
    mults = (1, 2, 5) if math.log10(hi / lo) < 2.5 else (1,)  # keep tick labels apart on long axes
    for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for mult in mults:
            v = mult * 10.0 ** k
            if lo <= v <= hi:
                y = py1 - scale(v) * (py1 - py0)
                draw.line([px0, y, px1, y], fill=(225, 225, 225))
                draw.text((x0, y - 6), f'{v:g}', fill=(90, 90, 90), font=small)
    n = len(x_labels)
    xs = [px0 + (i + 0.5) * (px1 - px0) / n for i in range(n)]
    for x, label in zip(xs, x_labels):
        draw.text((x - 3 * len(label), py1 + 4), label, fill=(60, 60, 60), font=small)
    if floor:
        y = py1 - scale(floor) * (py1 - py0)
        for xa in range(int(px0), int(px1), 8):
            draw.line([xa, y, min(xa + 4, px1), y], fill=(0, 0, 0))
        draw.text((px1 - 30, y - 13), 'real', fill=(0, 0, 0), font=small)
    for ys, colour, marker in series:
        points = [(x, py1 - scale(v) * (py1 - py0)) if _finite([v]) else None for x, v in zip(xs, ys)]
        for a, b in zip(points, points[1:]):
            if a and b:
                draw.line([a, b], fill=colour, width=2)
        for p in points:
            if p:
                _marker(draw, p[0], p[1], marker, colour)
    legend_x = px0 + 4
    for name, colour, marker in legend:
        _marker(draw, legend_x + 4, y1 - 10, marker, colour)
        draw.text((legend_x + 12, y1 - 17), name, fill=colour, font=small)
        legend_x += 12 + 7 * len(name) + 10


def make_figure(results: dict, strips: dict[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
    """Heat tables of the 3x3 grid, line charts (MSE per t, bottleneck sweep) and a sample strip per cell."""
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

    cells = results['cells']
    s = results['settings']
    real = results['baselines']['real']
    font, small, big = _font(13), _font(11), _font(16)
    width = 1000
    grid = {(c['pred'], c['loss']): c for c in cells if 'pred_loss' in c['grids']}
    sweep = [c for c in cells if 'bottleneck' in c['grids']]
    scale_px = 2
    size = s['image_size'] * scale_px
    strip_h = size + 6
    height = 50 + (190 if grid else 0) + 230 + 30 + len(cells) * strip_h + 20
    image = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"JiT ablation at small scale: {s['image_size']} px, patch {s['patch_size']} "
                       f"({s['patch_dim']}-d patches) into width {s['hidden_size']}, {s['steps']} steps/cell",
              fill=(0, 0, 0), font=big)
    draw.text((10, 30), 'lower is better everywhere; colours: log scale within each table; '
                        'dashed line = real held-out images', fill=(90, 90, 90), font=small)
    y = 50
    if grid:
        tables = (('mse_mean', 'held-out x-MSE (mean over t)', None),
                  ('nn_rmse', 'sample NN RMSE', real['nn_rmse']),
                  ('fd_rp', f"sample Frechet dist. (RP-{s['rp_dim']})", real['fd_rp']))
        tw = (width - 20) // 3
        for i, (key, title, floor) in enumerate(tables):
            x0 = 10 + i * tw
            draw.text((x0, y), title, fill=(0, 0, 0), font=font)
            if floor is not None:
                draw.text((x0, y + 16), f'real: {_fmt(floor, 3)}', fill=(90, 90, 90), font=small)
            scale, _ = _log_scale([c[key] for c in grid.values()], lo_pad=0.0)
            cw, ch, gx, gy = 80, 36, x0 + 62, y + 50
            for j, pred in enumerate(SPACES):
                draw.text((gx + j * cw + 18, gy - 16), f'{pred}-pred', fill=PRED_COLOURS[pred], font=small)
            for r, loss in enumerate(SPACES):
                draw.text((x0, gy + r * ch + 12), f'{loss}-loss', fill=(0, 0, 0), font=small)
                for j, pred in enumerate(SPACES):
                    c = grid.get((pred, loss))
                    box = [gx + j * cw, gy + r * ch, gx + (j + 1) * cw - 3, gy + (r + 1) * ch - 3]
                    v = c[key] if c else None
                    ok = bool(_finite([v]))
                    draw.rectangle(box, fill=_heat(scale(v)) if ok else (200, 200, 200))
                    draw.text((box[0] + 8, box[1] + 10), _fmt(v, 3), fill=(0, 0, 0), font=font)
        y += 190
    # Line charts: MSE per t for the 3x3 grid, and the bottleneck sweep (MSE and NN RMSE).
    cw = (width - 20) // 3
    per_t = grid or {(c['pred'], c['loss']): c for c in cells if 'lowdim' in c['grids']}
    if per_t:
        series = [([per_t[(p, l)]['mse'][f'{t:g}'] for t in T_GRID], PRED_COLOURS[p], LOSS_MARKERS[l])
                  for p in SPACES for l in SPACES if (p, l) in per_t]
        legend = [(f'{p}-pred', PRED_COLOURS[p], 'circle') for p in SPACES]
        _line_chart(draw, (10, y, 10 + cw - 10, y + 220), [f't={t:g}' for t in T_GRID], series,
                    f"held-out x-MSE vs t ({'3x3 grid' if grid else 'low-dim patches'})", legend, font=font,
                    small=small)
        draw.text((10, y + 222), '  '.join(f'{l}-loss: {LOSS_MARKERS[l]}' for l in SPACES), fill=(90, 90, 90),
                  font=small)
    if sweep:
        widths = sorted({c['bottleneck_dim'] for c in sweep})
        labels = [f"{w}{'*' if w == s['patch_dim'] else ''}" for w in widths]
        for k, (key, title, floor) in enumerate((('mse_mean', 'bottleneck: x-MSE mean', None),
                                                 ('nn_rmse', 'bottleneck: sample NN RMSE', real['nn_rmse']))):
            series, legend = [], []
            for pred in SWEEP_PREDS:
                by_width = {c['bottleneck_dim']: c[key] for c in sweep if c['pred'] == pred}
                if by_width:
                    series.append(([by_width.get(w, float('nan')) for w in widths], PRED_COLOURS[pred], 'circle'))
                    legend.append((f'{pred}-pred', PRED_COLOURS[pred], 'circle'))
            x0 = 10 + (k + 1) * cw
            _line_chart(draw, (x0, y, x0 + cw - 10, y + 220), labels, series, title + ' (*=full)', legend,
                        floor=floor, font=font, small=small)
    y += 250
    draw.text((10, y), f'samples (one row per cell, {s["samples_per_class"]} per class drawn; first of each class '
                       'shown, same start noise in every row)', fill=(0, 0, 0), font=font)
    y += 24
    for c in cells:
        strip = strips.get(c['name'])
        label = f"{c['name']}"
        draw.text((10, y + 4), label, fill=PRED_COLOURS.get(c['pred'], (0, 0, 0)), font=font)
        draw.text((10, y + 22), f"MSE {_fmt(c['mse_mean'], 3)}  NN {_fmt(c['nn_rmse'], 3)}", fill=(90, 90, 90),
                  font=small)
        draw.text((10, y + 38), f"FD {_fmt(c['fd_rp'], 3)}", fill=(90, 90, 90), font=small)
        if strip is not None:
            for i, img in enumerate(strip):
                tile = Image.fromarray(img).resize((size, size), Image.NEAREST)
                x = 230 + i * (size + 4)
                if x + size > width:
                    break
                image.paste(tile, (x, y))
        y += strip_h
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def strip_for(pixels: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` samples of every class, class by class: u8[k, h, w, c]."""
    picks = [i for cls in np.unique(labels) for i in np.flatnonzero(labels == cls)[:per_class]]
    return pixels[picks]


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m jit_jax.experiments.ablation',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='output folder (results.json, table.md, ablation.png)')
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


def _strip_key(name: str) -> str:
    return name.replace('/', '__')


def write_reports(results: dict, strips: dict[str, np.ndarray], out: pathlib.Path) -> None:
    (out / 'table.md').write_text(markdown_tables(results))
    make_figure(results, strips, out / 'ablation.png')


def replot(out: pathlib.Path) -> None:
    """table.md and ablation.png again from results.json and samples.npz (no JAX work)."""
    results = json.loads((out / 'results.json').read_text(), parse_constant=lambda c: float('nan'))
    results = _nan_from_null(results)
    strips = {}
    if (out / 'samples.npz').is_file():
        with np.load(out / 'samples.npz') as data:
            strips = {c['name']: data[_strip_key(c['name'])] for c in results['cells']
                      if _strip_key(c['name']) in data.files}
    write_reports(results, strips, out)
    print(f"rewrote {out / 'table.md'} and {out / 'ablation.png'}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    if args.replot:
        replot(out)
        return {}
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
    configs = [load_default_config(args.config, cell_overrides(c, args.steps, args.quick, args.seed))
               for c in cells]
    first = configs[0]
    settings = QUICK_EVAL if args.quick else EvalSettings()
    print(f'ablation: {len(cells)} cells x {args.steps} steps; rendering {settings.num_reference} reference and '
          f'{settings.num_heldout} held-out images', flush=True)
    scorer = Scorer(first.data.image_size, first.data.num_classes, settings)
    print(f"real baseline: NN RMSE {scorer.real['nn_rmse']:.4f}, NN label acc {scorer.real['nn_label_acc']:.3f}, "
          f"FD {scorer.real['fd_rp']:.4f}", flush=True)
    progress = Progress(args.steps * len(cells))
    rows, strips = [], {}
    for i, (cell, config) in enumerate(zip(cells, configs), start=1):
        row, pixels = run_cell(config, cell, scorer, progress, i, len(cells),
                               log_every=max(1, min(args.log_every, args.steps)))
        rows.append(row)
        strips[cell.name] = strip_for(pixels, scorer.sample_labels, settings.strip_per_class)
        print(f"cell {i}/{len(cells)} {cell.name} done: MSE mean {_fmt(row['mse_mean'])}, NN RMSE "
              f"{_fmt(row['nn_rmse'])}, FD {_fmt(row['fd_rp'])} ({row['train_seconds']} s train, "
              f"{row.get('eval_seconds', 0)} s eval)", flush=True)
    sampler_steps = settings.sampler_steps or first.sampler.num_steps
    results = {'settings': settings_record(first, args, scorer, sampler_steps),
               'baselines': {'real': scorer.real}, 'cells': rows,
               'wall_seconds': round(time.time() - wall, 1)}
    (out / 'results.json').write_text(json.dumps(_json_safe(results), indent=2) + '\n')
    # The strips are kept so that `--replot` can redraw the table and figure without training again.
    np.savez_compressed(out / 'samples.npz', **{_strip_key(k): v for k, v in strips.items()})
    write_reports(results, strips, out)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'ablation.png'} "
          f"in {_hms(results['wall_seconds'])}", flush=True)
    return results


def _nan_from_null(tree: Any) -> Any:
    """Undo _json_safe for the figures: a null figure is a diverged cell's NaN."""
    if isinstance(tree, dict):
        return {k: float('nan') if v is None and k in _FIGURE_KEYS else _nan_from_null(v)
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [_nan_from_null(v) for v in tree]
    return tree


_FIGURE_KEYS = {'mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp'} | {f'{t:g}' for t in T_GRID}


def _json_safe(tree: Any) -> Any:
    """NaN / inf -> None: JSON has no NaN, and a diverged cell must still give a valid file."""
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


if __name__ == '__main__':
    main()
