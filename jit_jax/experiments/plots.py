"""The experiments' figures (matplotlib: the optional 'plots' extra, pip install "jit_jax[plots]") and tables.

toy_grid: rows D, columns prediction target, samples over the true spiral. ablation_figure: the 3x3 table
of each figure as a heat map, held-out MSE against t, the bottleneck sweep, and one sample strip per cell.
ablation_tables: the same figures as markdown (table.md). All take plain numbers and arrays (what
results.json and samples.npz hold), so they can be redrawn without JAX.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPACES = ('x', 'eps', 'v')
PRED_COLOURS = {'x': 'tab:blue', 'eps': 'tab:red', 'v': 'tab:orange'}
LOSS_MARKERS = {'x': 'o', 'eps': 's', 'v': '^'}


def _pyplot():
    """matplotlib with the file-only backend (no display on servers and CI)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError('the figures need matplotlib: pip install "jit_jax[plots]" (or matplotlib)') from error
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a table or a label: n/a for a diverged (NaN or missing) value."""
    if not _finite(value):
        return 'n/a' if value is None or isinstance(value, float) else str(value)
    return f'{value:.{digits}g}' if abs(value) < 1e4 else f'{value:.3e}'


def toy_grid(samples: Mapping[tuple[int, str], np.ndarray], curve: np.ndarray, dims: Sequence[int],
             preds: Sequence[str], cells: Sequence[dict], path: pathlib.Path, *, half_width: float,
             caption: str = '') -> pathlib.Path:
    """Rows are D, columns are prediction targets; the true spiral under translucent samples, so density
    shows. Samples outside the window are clipped to its border (a diverged cell shows up as a frame of
    dots rather than an empty panel); each panel prints its manifold distance."""
    plt = _pyplot()
    scores = {(c['D'], c['pred']): c['manifold_distance'] for c in cells}
    fig, axes = plt.subplots(len(dims), len(preds), figsize=(2.6 * len(preds), 2.6 * len(dims)), squeeze=False)
    for r, dim in enumerate(dims):
        for c, pred in enumerate(preds):
            ax = axes[r, c]
            ax.plot(curve[:, 0], curve[:, 1], color='tab:blue', lw=0.8)
            pts = samples.get((dim, pred))
            if pts is not None:
                edge = 0.97 * half_width  # just inside the frame, so clipped points stay visible
                pts = np.clip(np.where(np.isfinite(pts), pts, edge), -edge, edge)
                ax.scatter(pts[:, 0], pts[:, 1], s=1.5, color='tab:red', alpha=0.35, linewidths=0)
            ax.text(0.03, 0.97, f'md {fmt(scores.get((dim, pred)))}', transform=ax.transAxes, va='top',
                    fontsize=8)
            ax.set(xlim=(-half_width, half_width), ylim=(-half_width, half_width), xticks=[], yticks=[],
                   aspect='equal')
            if r == 0:
                ax.set_title(f'{pred}-pred')
            if c == 0:
                ax.set_ylabel(f'D={dim}')
    fig.suptitle('blue: true spiral; red: samples $P^T x$; md: mean distance to the spiral'
                 + (f'\n{caption}' if caption else ''), fontsize=9)
    return _save(fig, path)


def _heat_table(ax, grid: Mapping[tuple[str, str], dict], key: str, title: str) -> None:
    """Rows loss space, columns prediction space (the paper's Table 2 layout), colour on a log scale."""
    from matplotlib.colors import LogNorm  # pylint: disable=import-outside-toplevel

    values = np.array([[grid[(p, l)][key] if (p, l) in grid and _finite(grid[(p, l)][key]) else np.nan
                        for p in SPACES] for l in SPACES], float)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(positive.min(), positive.max() * 1.0001) if positive.size else None
    ax.imshow(np.ma.masked_invalid(values), cmap='RdYlGn_r', norm=norm, aspect='auto')
    for i in range(len(SPACES)):
        for j in range(len(SPACES)):
            ax.text(j, i, fmt(values[i, j]), ha='center', va='center', fontsize=9)
    ax.set(xticks=range(3), xticklabels=[f'{p}-pred' for p in SPACES], yticks=range(3),
           yticklabels=[f'{l}-loss' for l in SPACES], title=title)


def ablation_figure(results: dict, strips: Mapping[str, np.ndarray], path: pathlib.Path) -> pathlib.Path:
    """Heat tables of the 3x3 grid, line charts (MSE per t, bottleneck sweep) and a sample strip per cell."""
    plt = _pyplot()
    s, cells = results['settings'], results['cells']
    real = results['baselines']['real']
    grid = {(c['pred'], c['loss']): c for c in cells if 'pred_loss' in c['grids']}
    sweep = [c for c in cells if 'bottleneck' in c['grids']]
    per_t = grid or {(c['pred'], c['loss']): c for c in cells if 'lowdim' in c['grids']}
    chart_rows = (1 if grid else 0) + 1
    # Constrained layout in two subfigures: the charts' titles and tick labels never overlap, and the
    # sample strips (one row per cell) get their own height instead of sharing a grid with the charts.
    fig = plt.figure(figsize=(12, 3.0 * chart_rows + 0.8 * len(cells) + 0.5), layout='constrained')
    fig.suptitle(f"JiT ablation at small scale: {s['image_size']} px, patch {s['patch_size']} "
                 f"({s['patch_dim']}-d patches) into width {s['hidden_size']}, {s['steps']} steps/cell; "
                 'lower is better; dashed = real held-out images', fontsize=10)
    charts, strip_fig = fig.subfigures(2, 1, height_ratios=[3.0 * chart_rows, 0.8 * len(cells)])
    axes = charts.subplots(chart_rows, 3, squeeze=False)
    if grid:
        for ax, (key, title) in zip(axes[0], (('mse_mean', 'held-out x-MSE (mean over t)'),
                                              ('nn_rmse', f"sample NN RMSE (real {fmt(real['nn_rmse'])})"),
                                              ('fd_rp', f"sample FD, RP-{s['rp_dim']} (real {fmt(real['fd_rp'])})"))):
            _heat_table(ax, grid, key, title)
    lines = axes[-1]
    if per_t:
        t_grid = s['t_grid']
        for (pred, loss), c in sorted(per_t.items()):
            lines[0].plot(t_grid, [c['mse'][f'{t:g}'] for t in t_grid], color=PRED_COLOURS[pred],
                          marker=LOSS_MARKERS[loss], label=f'{pred}-pred/{loss}-loss')
        lines[0].set(yscale='log', xlabel='t', title='held-out x-MSE vs t')
        lines[0].legend(fontsize=6, ncol=2)
    else:
        lines[0].axis('off')
    widths = sorted({c['bottleneck_dim'] for c in sweep})
    for ax, (key, title, floor) in zip(lines[1:], (('mse_mean', 'bottleneck: x-MSE mean', None),
                                                   ('nn_rmse', 'bottleneck: sample NN RMSE', real['nn_rmse']))):
        if not sweep:
            ax.axis('off')
            continue
        for pred in dict.fromkeys(c['pred'] for c in sweep):
            by_width = {c['bottleneck_dim']: c[key] for c in sweep if c['pred'] == pred}
            ax.plot(range(len(widths)), [by_width.get(w, np.nan) for w in widths], marker='o',
                    color=PRED_COLOURS[pred], label=f'{pred}-pred')
        if floor is not None:
            ax.axhline(floor, color='k', ls='--', lw=0.8)
        ax.set(yscale='log', xticks=range(len(widths)), xlabel='bottleneck width', title=title + ' (*=full)',
               xticklabels=[f"{w}{'*' if w == s['patch_dim'] else ''}" for w in widths])
        ax.legend(fontsize=7)
    for ax, c in zip(strip_fig.subplots(len(cells), 1, squeeze=False)[:, 0], cells):
        strip = strips.get(c['name'])
        if strip is not None and len(strip):
            ax.imshow(np.concatenate(list(strip), axis=1), interpolation='nearest')
        ax.set(xticks=[], yticks=[])
        ax.set_ylabel(f"{c['name']}\nMSE {fmt(c['mse_mean'])} NN {fmt(c['nn_rmse'])} FD {fmt(c['fd_rp'])}",
                      rotation=0, ha='right', va='center', fontsize=7, color=PRED_COLOURS.get(c['pred'], 'k'))
    return _save(fig, path)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    fig.clf()
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    plt.close(fig)
    return path


def ablation_tables(results: dict) -> str:
    """The paper's Table 2 layout (rows loss, columns prediction) for each figure, then every cell."""
    cells, s = results['cells'], results['settings']
    lines = [f"Setup: {s['image_size']} px synthetic shapes, patch {s['patch_size']} ({s['patch_dim']}-d patches, "
             f"{s['tokens']} tokens), JiT width {s['hidden_size']}, depth {s['depth']}, batch "
             f"{s['global_batch_size']}, {s['steps']} steps per cell, {s['sampler']['method']} "
             f"{s['sampler']['num_steps']} steps, CFG {s['sampler']['cfg_scale']} on "
             f"{s['sampler']['interval']}.", '']
    grid = {(c['pred'], c['loss']): c for c in cells if 'pred_loss' in c['grids']}
    figures = (('mse_mean', 'held-out x-space MSE, mean over t'), ('nn_rmse', 'sample NN RMSE to real images'),
               ('fd_rp', f"sample Frechet distance (random {s['rp_dim']}-d projection)"))
    for key, title in figures if grid else ():
        lines += [f'**{title}** (rows: loss space, columns: prediction space; full-rank patch embedding)', '',
                  '| loss \\ pred | x-pred | eps-pred | v-pred |', '|---|---|---|---|']
        for loss in SPACES:
            row = [fmt(grid[(p, loss)][key], 4) if (p, loss) in grid else '' for p in SPACES]
            lines += [f'| {loss}-loss | ' + ' | '.join(row) + ' |']
        lines.append('')
    sweep = [c for c in cells if 'bottleneck' in c['grids']]
    if sweep:
        widths = sorted({c['bottleneck_dim'] for c in sweep})
        lines += ['**Bottleneck sweep** (v-loss; entries: mean MSE / NN RMSE / FD)', '',
                  '| pred \\ bottleneck | ' + ' | '.join(
                      f"{w}{' (full)' if w == s['patch_dim'] else ''}" for w in widths) + ' |',
                  '|---|' + '---|' * len(widths)]
        for pred in dict.fromkeys(c['pred'] for c in sweep):
            by_width = {c['bottleneck_dim']: c for c in sweep if c['pred'] == pred}
            if by_width:
                lines.append(f'| {pred}-pred | ' + ' | '.join(
                    ' / '.join(fmt(by_width[w][k], 3) for k in ('mse_mean', 'nn_rmse', 'fd_rp'))
                    if w in by_width else '' for w in widths) + ' |')
        lines.append('')
    lowdim = [c for c in cells if 'lowdim' in c['grids']]
    if lowdim:
        lines += [f"**Low-dim patches** (patch {lowdim[0]['patch_size']}: {lowdim[0]['patch_dim']}-d patches, "
                  f"narrower than the width {s['hidden_size']}; v-loss; full-rank embedding)", '',
                  '| pred | MSE mean | NN RMSE | FD |', '|---|---|---|---|']
        lines += [f"| {c['pred']}-pred | " + ' | '.join(fmt(c[k], 3) for k in ('mse_mean', 'nn_rmse', 'fd_rp'))
                  + ' |' for c in lowdim] + ['']
    real = results['baselines']['real']
    lines += ['**All cells** (MSE per t on held-out images; sample figures; `real` = held-out real images '
              'scored like samples)', '',
              '| cell | ' + ' | '.join(f'MSE t={t:g}' for t in s['t_grid'])
              + ' | MSE mean | NN RMSE | NN label acc | FD | final loss | train s |',
              '|---|' + '---|' * (len(s['t_grid']) + 6)]
    for c in cells:
        lines.append(f"| {c['name']} | " + ' | '.join(fmt(c['mse'][f'{t:g}'], 3) for t in s['t_grid'])
                     + ' | ' + ' | '.join(fmt(c[k], 3) for k in ('mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp',
                                                                   'final_loss'))
                     + f" | {fmt(c['train_seconds'], 4)} |")
    lines += [f"| real | {' | '.join('' for _ in s['t_grid'])} |  | {fmt(real['nn_rmse'], 3)} | "
              f"{fmt(real['nn_label_acc'], 3)} | {fmt(real['fd_rp'], 3)} |  |  |", '']
    return '\n'.join(lines)
