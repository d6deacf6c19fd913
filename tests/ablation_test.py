"""Tests for the small-scale ablation (jit_jax.experiments.ablation and its figures in .scores): the figures,
the grid, and a smoke run of the real command (`--quick`: two cells, a 1-block model, ten steps) checked for
schema, finiteness, per-cell training workdirs (checkpoints, logs), resume and --replot."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jit_jax.experiments import ablation, scores

REPO = pathlib.Path(__file__).resolve().parents[1]
CELL_KEYS = {'name', 'grids', 'pred', 'loss', 'bottleneck', 'bottleneck_dim', 'patch_size', 'patch_dim',
             'steps', 'diverged_at', 'final_loss', 'workdir', 'train_seconds', 'first_step_seconds', 'mse',
             'mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp', 'eval_seconds'}
FIGURES = ('mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp', 'final_loss')


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    shift = np.arange(6.0)
    # Same covariance: only the mean term is left.
    assert scores.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2 a: covariance 4 S, so tr(S) + tr(4 S) - 2 tr(2 S) = tr(S), plus the mean term |mu|^2.
    cov, mu = np.cov(a, rowvar=False), a.mean(0)
    assert scores.frechet_distance(a, 2 * a) == pytest.approx(float(np.trace(cov) + mu @ mu), rel=1e-6)
    assert abs(scores.frechet_distance(a, a)) < 1e-6


def test_nearest_neighbours_finds_exact_copies_and_reports_rmse():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 12))
    queries = reference[[5, 17, 299]] + np.array([[0.0], [0.0], [0.5]])  # last one offset by 0.5 per entry
    dist, index = scores.nearest_neighbours(queries, reference, block=2)
    assert list(index[:2]) == [5, 17]
    np.testing.assert_allclose(dist[:2], 0.0, atol=1e-6)
    assert dist[2] <= 0.5 + 1e-9  # the offset copy is at RMSE exactly 0.5; a closer row may exist


def test_grids_share_cells_and_quick_keeps_a_contrast():
    cells = ablation.make_cells('all')
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 9 + len(ablation.BOTTLENECKS) - 1 + len(
        ablation.CONTRAST_BOTTLENECKS) - 1
    shared = {c.name for c in cells if set(c.grids) == {'pred_loss', 'bottleneck'}}
    assert shared == {'x-pred/v-loss/bn-full', 'eps-pred/v-loss/bn-full'}
    assert {(c.pred, c.loss) for c in ablation.make_cells('pred_loss')} == {
        (p, l) for p in ablation.SPACES for l in ablation.SPACES}
    assert {c.pred for c in ablation.make_cells('all', quick=True)} == {'x', 'eps'}
    assert {c.bottleneck for c in ablation.make_cells('bottleneck', quick=True)} == {8, 0}
    with pytest.raises(ValueError, match='--grid'):
        ablation.make_cells('pred-loss')


def test_lowdim_cells_make_patches_narrower_than_the_network():
    """The control of Table 2b: with patches narrower than the width, eps and v are reachable again."""
    cells = ablation.make_cells('lowdim')
    assert {c.pred for c in cells} == set(ablation.SPACES) and all(c.loss == 'v' for c in cells)
    for cell in cells:
        config = ablation.cell_config(cell, 800)
        m = config.model
        assert m.patch_size == ablation.LOWDIM_PATCH and m.patch_size ** 2 * m.in_channels < m.hidden_size
        assert cell.name.endswith(f'/p{ablation.LOWDIM_PATCH}')


@pytest.mark.parametrize('quick', [False, True])
def test_cell_config_puts_patches_wider_than_the_network(quick):
    """The premise of the 3x3 grid: a patch has more dimensions than the width that must reproduce it."""
    cell = ablation.Cell('eps', 'x', 16, ('bottleneck',))
    config = ablation.cell_config(cell, 800, quick=quick, seed=3)
    m = config.model
    assert m.patch_size ** 2 * m.in_channels > m.hidden_size
    assert (config.diffusion.pred, config.diffusion.loss, m.bottleneck_dim) == ('eps', 'x', 16)
    assert config.data.source == 'synthetic' and config.train.num_steps == 800 and config.seed == 3
    assert config.optim.warmup_steps == 80
    assert tuple(config.optim.ema_decays) == (0.995, 0.99)
    assert config.train.sample_every_steps == 0 and config.train.log_every_steps == 50


def _run_quick(out: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, not conftest's eight
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
    env['JAX_PLATFORMS'] = 'cpu'
    proc = subprocess.run([sys.executable, '-m', 'jit_jax.experiments.ablation', '--out', str(out), '--quick'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_quick_command_writes_finite_results_and_resumes(tmp_path):
    out = tmp_path / 'ablation'
    proc = _run_quick(out)
    assert 'cell 2/2' in proc.stdout
    assert 'ETA' in proc.stderr and '(20/20)' in proc.stderr  # clu ReportProgress over the whole grid

    results = json.loads((out / 'results.json').read_text())
    assert set(results) == {'settings', 'baselines', 'cells', 'wall_seconds'}
    settings = results['settings']
    assert settings['quick'] is True and settings['t_grid'] == list(scores.T_GRID)
    assert settings['patch_dim'] > settings['hidden_size']
    for key in ('nn_rmse', 'nn_label_acc', 'fd_rp'):
        assert math.isfinite(results['baselines']['real'][key])
    cells = {c['name']: c for c in results['cells']}
    assert set(cells) == {'x-pred/v-loss/bn-full', 'eps-pred/v-loss/bn-full'}
    for cell in cells.values():
        assert set(cell) == CELL_KEYS
        assert cell['diverged_at'] is None and cell['steps'] == 10
        assert set(cell['mse']) == {f'{t:g}' for t in scores.T_GRID}
        values = list(cell['mse'].values()) + [cell[k] for k in FIGURES]
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values), cell
        assert cell['mse_mean'] == pytest.approx(np.mean(list(cell['mse'].values())))
        # Each cell is a train_and_evaluate run: its own checkpoints (final step) and TensorBoard logs.
        workdir = pathlib.Path(cell['workdir'])
        assert (workdir / 'checkpoints' / '10').is_dir() and list(workdir.glob('events.out.tfevents.*'))
        assert json.loads((workdir / 'config.json').read_text())['diffusion']['pred'] == cell['pred']
    # Converted to x, an eps-prediction's error is amplified by (1 - t) / t: even untrained, the two cells
    # must differ by far more than noise (measured: ~280x at t = 0.1). Equal values would mean no conversion.
    assert cells['eps-pred/v-loss/bn-full']['mse']['0.1'] > 10 * cells['x-pred/v-loss/bn-full']['mse']['0.1']

    table = (out / 'table.md').read_text()
    assert '| x-pred/v-loss/bn-full |' in table and 'eps-pred' in table
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(out / 'ablation.png') as image:
        assert image.format == 'PNG' and image.width >= 800 and image.height >= 400

    # The same command again finds every cell finished: no training step runs, the figures are the same
    # (scored from the restored final checkpoints).
    proc = _run_quick(out)
    again = {c['name']: c for c in json.loads((out / 'results.json').read_text())['cells']}
    assert 'ETA' not in proc.stderr and all(c['first_step_seconds'] is None for c in again.values())
    for name, cell in cells.items():
        for key in ('mse', 'mse_mean', 'nn_rmse', 'nn_label_acc', 'fd_rp'):
            assert again[name][key] == cell[key], (name, key)

    # --replot redraws from results.json and samples.npz alone.
    table = (out / 'table.md').read_text()
    (out / 'ablation.png').unlink()
    (out / 'table.md').unlink()
    assert ablation.main(['--out', str(out), '--replot']) == {}
    assert (out / 'table.md').read_text() == table and (out / 'ablation.png').is_file()
