"""Ahead-of-time TPU compiles of the real train step (jit_jax.aot): sharding, memory and collectives as XLA:TPU
builds them. libtpu (the 'tpu' extra, part of the 'test' extra) holds the compiler; no TPU is needed."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jit_jax import aot, aot_analysis, aot_tables, config_lib, sharding

TINY = ('hidden=256,depth=2,heads=4,model.mlp_ratio=1.5,bottleneck=32,ctx_len=4,ctx_start=1,img_size=32,patch=4,'
        'sampling_steps=3')


def _config(extra: str = '', batch: int = 16):
    return config_lib.load(f"configs/default.py:{','.join(filter(None, [TINY, f'batch={batch}', extra]))}")


def _shard_bytes(tree, shardings) -> int:
    return sum(math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@pytest.mark.parametrize('extra,topology', [
    ('', 'v5e-4'),  # data parallel: replicated parameters
    ('mesh.data=1,mesh.fsdp=-1,mesh.param_sharding=fsdp', 'v5p-8'),  # FSDP over 4 v5p chips
])
def test_train_step_compiles_for_tpu_with_the_run_sharding(extra, topology, monkeypatch):
    monkeypatch.setattr(sharding, 'MIN_SHARDED_SIZE', 2 ** 10)  # let the tiny model's matrices split
    config = _config(extra)
    topo = aot.parse_topology(topology)
    trainer = aot.make_trainer(config, topo)
    assert trainer.mesh.devices.flat[0].platform == 'tpu'
    assert trainer.model_config.attention_impl == config_lib.BACKEND_DEFAULTS['tpu']['attention_impl']
    lowered = aot.lower_train_step(trainer)
    result = aot.analyse(lowered, topo.chip.hbm_gib)
    assert result['fits'], result
    chips = topo.chips_per_slice
    state = _shard_bytes(trainer.abstract_state, trainer.state_shardings)
    batch = config.data.global_batch_size // chips * (32 * 32 * 3 * 4 + 4)
    # The program's per-device inputs are exactly the sharded state and this chip's rows of the batch.
    assert result['input_element_bytes'] == state + batch
    full = _shard_bytes(trainer.abstract_state, jax.tree.map(lambda _: sharding.replicated(trainer.mesh),
                                                             trainer.state_shardings))
    mem = result['memory']
    assert mem['argument'] >= state + batch  # tiles only pad
    assert mem['alias'] >= 0.99 * state, 'the donated state is updated in place'
    kinds = result['collectives']
    if 'fsdp' in extra:
        assert state < 0.5 * full, 'parameters, moments and EMAs are split over the fsdp axis'
        assert kinds.get('all-gather', {}).get('count', 0) >= 2 * config.model.depth, \
            f'each block gathers its weights: {kinds}'
        assert 'all-to-all' not in kinds or kinds['all-to-all']['bytes'] < 2 ** 20, f'activations stay put: {kinds}'
    else:
        assert state == full
        assert 'all-gather' not in kinds, f'replicated weights are never gathered: {kinds}'
        assert kinds['all-reduce']['bytes'] >= 0.9 * _shard_bytes(
            trainer.abstract_state['params'], trainer.state_shardings['params']) / 2, 'gradients are summed (bf16)'
    analytic = aot.train_flops_analytic(trainer.model_config, config.data.global_batch_size) / chips
    assert 0.7 < result['cost']['flops'] / analytic < 1.5, 'XLA counts about 3 forward passes of matmuls'


def test_buffers_lists_the_largest_allocations_of_a_program_that_fits():
    config = _config('')
    topo = aot.parse_topology('v5e-4')
    lowered = aot.lower_train_step(aot.make_trainer(config, topo))
    result = aot.analyse(lowered, topo.chip.hbm_gib, buffers=10_000)  # every allocation
    largest = result['largest']
    assert result['fits'] and 10 < len(largest) < 10_000
    assert aot.analyse(lowered, topo.chip.hbm_gib, buffers=4)['largest'] == largest[:4]
    sizes = [b['bytes'] for b in largest]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] > 0
    assert sizes[0] <= result['memory']['peak'] and all('[' in b['shapes'] and b['values'] >= 1 for b in largest)
    assert sum(sizes) >= result['memory']['temp'], 'the report covers at least the temporaries'
    assert 'largest' not in aot.analyse(lowered, topo.chip.hbm_gib)


def test_entry_parameters_reads_plain_and_tuple_parameters():
    hlo = ('HloModule m\n\n%f (a: f32[2]) -> f32[2] {\n  %a = f32[2]{0} parameter(0)\n}\n\n'
           'ENTRY %main (p0: (f32[20,7680], bf16[], s32[]), p1: f32[16,512,512,3]) -> f32[] {\n'
           '  %p0 = (f32[20,7680]{1,0:T(8,128)}, /*index=1*/bf16[]{:T(256)}, s32[]) parameter(0), sharding={replicated}\n'
           '  %p1 = f32[16,512,512,3]{2,1,3,0:T(8,128)} parameter(1)\n  ROOT %r = f32[] constant(0)\n}\n')
    params = aot_analysis.entry_parameters(hlo)
    assert [(p['dtype'], p['shape']) for p in params] == [
        ('f32', (20, 7680)), ('bf16', ()), ('s32', ()), ('f32', (16, 512, 512, 3))]
    assert sum(p['bytes'] for p in params) == 20 * 7680 * 4 + 2 + 4 + 16 * 512 * 512 * 3 * 4


def test_memory_usage_report_parsing_keeps_the_default_memory_space():
    text = ('Memory Space: default (color=0)\nTotal bytes: 2097152 (2.00MiB)\n'
            '  cumulative_size;       size;       offset; used_by_n_values; shapes_list\n  ------\n'
            '  512.0KiB( 25%);  512.0KiB;      1048576;                2; bf16[4,8], f32[2]\n'
            '    2.00MiB(100%);    1.50MiB;         4096;                1; f32[8,16,192]\n'
            'Memory Space: vmem (color=1)\n    9.00MiB(100%);    9.00MiB;   0;   1; f32[1]\n')
    assert aot_analysis.largest_allocations(text, top=5) == [
        {'bytes': 3 * 2 ** 19, 'offset_bytes': 4096, 'values': 1, 'shapes': 'f32[8,16,192]'},
        {'bytes': 2 ** 19, 'offset_bytes': 1048576, 'values': 2, 'shapes': 'bf16[4,8], f32[2]'}]
    assert aot_analysis.largest_allocations(text, top=1)[0]['bytes'] == 3 * 2 ** 19
    assert aot_analysis.largest_allocations('no report') == []


def test_out_of_memory_is_a_report_not_a_traceback():
    config = _config('data.num_train_examples=100000', batch=65536)  # 16384 images per v5e chip
    rep = aot.report(config, aot.parse_topology('v5e-4'), programs=('train',))
    result = rep['programs']['train']
    assert not result['fits']
    assert result['needs_gib'] > result['capacity_gib'] > 10
    assert result['largest'] and result['largest'][0]['gib'] > 1
    text = aot.format_report(rep)
    assert 'does not fit: needs' in text and f"of {result['capacity_gib']:.2f} GiB" in text


@pytest.mark.parametrize('text,grid,chips', [('v5p-128', '4x4x4', 64), ('v4-64', '2x4x4', 32), ('v5e-4', '2x2', 4),
                                             ('v6e:4x8', '4x8', 32), ('h100-16', '16', 16)])
def test_topology_names(text, grid, chips):
    topo = aot.parse_topology(text)
    assert (topo.grid, topo.chips_per_slice) == (grid, chips)


@pytest.mark.parametrize('text', ['v5p-7', 'v5e:2x2x2', 'v7-8', 'h100-12'])
def test_bad_topology_names_are_rejected(text):
    with pytest.raises(ValueError, match='topology'):
        aot.parse_topology(text)


def test_collectives_parse_async_and_fused_forms():
    hlo = '\n'.join([
        'ENTRY %main (p: f32[8]) -> f32[8] {',
        '  %ag = (bf16[4,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(%x), dimensions={0}',
        '  %ar = f32[256]{0} all-reduce(%y), to_apply=%add',
        '  %rs = bf16[2,128]{1,0} fusion(%z), kind=kCustom, calls=%all-reduce-scatter.3',
        '}'])
    out = aot.collectives(hlo)
    assert out == {'all-gather': {'count': 1, 'bytes': 16 * 128 * 2}, 'all-reduce': {'count': 1, 'bytes': 1024},
                   'reduce-scatter': {'count': 1, 'bytes': 2 * 128 * 2}}


def test_cached_reports_compiled_under_other_defaults_are_not_reused(tmp_path):
    spec = f'configs/default.py:{TINY}'
    cfg = config_lib.model_config(config_lib.load(spec), platform='tpu')
    numerics = {k: getattr(cfg, k) for k in aot_tables._NUMERICS}  # pylint: disable=protected-access
    key = f'{spec} |  | v5e-4 | train'
    path = tmp_path / 'cache.json'
    path.write_text(json.dumps({key: {'model': numerics}}))
    assert aot_tables.Cache(str(path), cached_only=True).get(spec, '', 'v5e-4') == {'model': numerics}
    path.write_text(json.dumps({key: {'model': {**numerics, 'custom_vjp': not cfg.custom_vjp}}}))
    assert aot_tables.Cache(str(path), cached_only=True).get(spec, '', 'v5e-4') is None, 'stale: recompile'


class _AffineCompiler:
    """Stands in for aot_tables.Cache: the train step's peak is fixed + per_image * per-chip batch, and a
    batch compiles (reports a peak) only under the chip's HBM. Counts the compiles the search asks for."""

    def __init__(self, fixed_gib, per_image_gib, hbm_gib=95.0, chips=16, bend_at=None):
        self.fixed, self.per_image, self.hbm, self.chips, self.bend_at = fixed_gib, per_image_gib, hbm_gib, chips, bend_at
        self.compiled = set()

    def peak(self, per_chip):
        extra = 0.0 if self.bend_at is None or per_chip < self.bend_at else 4.0  # a jump the guess misses
        return self.fixed + self.per_image * per_chip + extra

    def get(self, spec, overrides, topology):
        del spec, topology
        per_chip = int(overrides.removeprefix('batch=')) // self.chips
        self.compiled.add(per_chip)
        peak = self.peak(per_chip)
        memory = {'peak': peak * 2**30} if peak <= self.hbm else None
        return {'chip': {'hbm_gib': self.hbm}, 'programs': {'train': {'memory': memory, 'needs_gib': peak}}}


@pytest.mark.parametrize('fixed, per_image, bend_at', [(3.0, 0.19, None), (3.0, 0.19, 100), (90.0, 2.0, None),
                                                         (96.0, 1.0, None), (1.0, 0.001, 40)])
def test_max_batch_search_finds_the_boundary_in_few_compiles(fixed, per_image, bend_at):
    fake = _AffineCompiler(fixed, per_image, bend_at=bend_at)
    best, rep = aot_tables.max_batch(fake, 'configs/jit_b16_in256.py', 'v5p-32')
    truth = max([b for b in range(1, 100_000) if fake.peak(b) <= fake.hbm] or [0])
    assert best == truth
    if truth:
        assert rep['programs']['train']['memory']['peak'] / 2**30 == pytest.approx(fake.peak(truth))
    assert len(fake.compiled) <= 2 * math.log2(max(abs(truth - 8), 2)) + 4, sorted(fake.compiled)


def test_variants_table_lists_the_chosen_variants_and_rejects_unknown_names(tmp_path, capsys):
    path = tmp_path / 'empty.json'
    path.write_text('{}')
    cache = aot_tables.Cache(str(path), cached_only=True)  # nothing cached: every row 'not compiled'
    rows = aot_tables.variants_table(cache, 'configs/jit_h16_in256.py', 'v5p-128', ['configured', 'dots']).splitlines()
    assert [r.split(' | ')[0] for r in rows if 'not compiled' in r] == ['| as configured', '| remat dots']
    all_rows = aot_tables.variants_table(cache, 'configs/jit_h16_in256.py', 'v5p-128')
    assert all_rows.count('not compiled') == len(aot_tables.VARIANTS)
    with pytest.raises(SystemExit):
        aot_tables.main(['variants', '--cached-only', '--cache', str(path), '--variants', 'dots,remat'])
    assert "--variants ['remat']" in capsys.readouterr().err


@pytest.mark.parametrize('spec,topology', aot_tables.PAPER_RUNS + aot_tables.GPU_PAPER_RUNS)
def test_memory_model_within_10_percent_of_the_recorded_paper_compiles(spec, topology):
    """The model against what XLA:TPU / XLA:GPU compiled for each paper run (docs/tpu_compiles.json, written by
    `python -m jit_jax.aot_tables paper [--gpu]`): a change to the model, or to the program that makes a
    recorded compile stale, shows here."""
    rep = aot_tables.Cache(aot_tables.DEFAULT_CACHE, cached_only=True).get(spec, '', topology)
    assert rep is not None, f'{spec} on {topology}: no current compile in docs/tpu_compiles.json'
    compiled = rep['programs']['train']['memory']['peak']
    assert 0.9 <= aot_tables.predicted(spec, '', rep)['total'] / compiled <= 1.1


def test_importing_jit_jax_keeps_libtpu_quiet_on_a_host_without_a_tpu():
    """With libtpu installed, a CPU host's first device query makes libtpu log errors about TPU variables it
    cannot find; importing jit_jax first sets placeholders (jit_jax/__init__.py) and the log stays clean."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('TPU_') and k not in ('JAX_PLATFORMS', 'ALLOW_MULTIPLE_LIBTPU_LOAD')}

    def run(imports):
        out = subprocess.run([sys.executable, '-c', f'import {imports}; print(jax.default_backend())'], env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip(), out.stderr

    backend, noisy = run('jax')
    assert backend == 'cpu' and 'TPU_WORKER_HOSTNAMES' in noisy, 'libtpu logs about its variables without them'
    backend, quiet = run('jit_jax, jax')
    assert backend == 'cpu' and 'TPU_' not in quiet, quiet
